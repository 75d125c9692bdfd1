"""Applications built on the stages: the two demos, cluster submission (`l2c submit` and its typed resources),
and the scaling model behind docs/scale.md. Nothing in the stages imports from here."""
