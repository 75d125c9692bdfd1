"""l2c.eval: zero-shot retrieval, caption retrieval accuracy (CRA) and zero-shot classification."""
