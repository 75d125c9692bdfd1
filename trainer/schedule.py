"""Learning-rate schedules of both trainers: transformers' schedules with linear warmup."""

from __future__ import annotations

import torch

KINDS = ("cosine", "linear", "constant")


def make_scheduler(
    opt: torch.optim.Optimizer, total: int, warmup: int, kind: str = "cosine", min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup from 0 over `warmup` steps, then `kind` over the rest; cosine ends at `min_lr_ratio` x lr."""
    from transformers import get_scheduler

    if kind not in KINDS:
        raise ValueError(f"schedule {kind!r}: expected one of {', '.join(KINDS)}")
    warmup = min(warmup, total)
    if kind == "cosine" and min_lr_ratio > 0:
        return get_scheduler(
            "cosine_with_min_lr", opt, num_warmup_steps=warmup, num_training_steps=total,
            scheduler_specific_kwargs={"min_lr_rate": min_lr_ratio},
        )  # fmt: skip
    name = "constant_with_warmup" if kind == "constant" else kind
    return get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
