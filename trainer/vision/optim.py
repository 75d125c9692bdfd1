"""AdamW parameter groups: no decay on norms/biases/scales, layer-wise lr decay on the tower."""

from __future__ import annotations

import torch
from torch import nn

from l2c.trainer.vision.config import OptimConfig
from l2c.trainer.vision.tower import block_index_of, transformer_blocks


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases and scalars (logit scale/bias) get no weight decay."""
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Groups keyed by (lr scale, decay). Vision params at depth d of n blocks get layer_decay**(n+1-d)."""
    depth = block_index_of(model.tower)
    n = len(transformer_blocks(model.tower))  # a tower may have no parameters after its blocks (ResNet)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("tower."):
            scale = cfg.layer_decay ** (n + 1 - depth[name[len("tower.") :]])
        else:
            scale = cfg.head_lr_mult
        nd = no_decay(name, p)
        g = groups.setdefault(
            (scale, nd),
            {"params": [], "names": [], "lr_scale": scale, "weight_decay": 0.0 if nd else cfg.weight_decay},
        )
        g["params"].append(p)
        g["names"].append(name)
    return [
        {
            "params": g["params"],
            "lr": cfg.lr * g["lr_scale"],
            "weight_decay": g["weight_decay"],
            "lr_scale": g["lr_scale"],
        }
        for _, g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
