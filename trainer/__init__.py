"""l2c.trainer: the vision trainer (`vision/`) and the text fine-tuner (`text/`) over shared training support.

Shared here: `distributed` (process groups, all-gather), `checkpoint` (format, RNG state), `schedule`,
`runlog` (metrics writer and reader), `plots`, `ray_train` (the Ray Train launcher).
"""
