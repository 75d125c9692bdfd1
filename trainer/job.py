"""`TrainJob`: what one train-vision invocation is asked to do, passed whole instead of positional lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from l2c.errors import L2CError
from l2c.trainer.vision.config import TrainConfig


@dataclass
class TrainJob:
    """A vision training run: config, inputs, run directory, and how far and where this invocation goes.

    `max_steps` / `max_minutes` stop this invocation early (a checkpoint is written; running again goes on, see
    `l2c.trainer.resume` for the policy both trainers share);
    `cfg.steps` is the length of the schedule. `workers` > 0 runs that many Ray Train workers.
    """

    cfg: TrainConfig
    images: str | list[str] | None  # None: the tars `image_cache` was made from
    text_cache: str | Path
    out: str | Path
    resume: bool | None = None  # None: resume when `out` holds checkpoints; True: require one; False: refuse them
    overwrite: bool = False  # remove what an earlier train-vision wrote into `out` first (nothing else)
    max_steps: int | None = None
    max_minutes: float | None = None
    workers: int = 0
    ray_address: str | None = None
    use_gpu: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)
    image_cache: str | None = None  # a frozen tower's features (`l2c embed-images`) instead of decoding images

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise L2CError(f"--max-steps {self.max_steps}: must be at least 1 (leave it out to run the schedule)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise L2CError(f"--max-minutes {self.max_minutes}: must be above 0")
        if not self.images and not self.image_cache:
            raise L2CError("train-vision needs --images (image tars) or --image-cache (from `l2c embed-images`)")
        if self.workers < 0:
            raise L2CError(f"--workers {self.workers}: must be 0 (in-process) or more")
