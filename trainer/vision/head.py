"""The image side after the tower: which tower feature a head reads, and the head (a projection or an MLP).

`tower_features` is the one definition of an image's features, used by training on images (online), by
`l2c embed-images` (the cache) and by an exported model at eval, so a frozen tower's cached features and its
online ones are the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from l2c.trainer.vision.tower import tower_width


def patch_token_mean(tower: nn.Module, last_hidden_state: torch.Tensor) -> torch.Tensor:
    """Mean of the last layer's patch tokens: the last (image_size / patch_size)^2 tokens (CLS and register
    tokens come first in ViT, CLIP, DINOv2), all tokens when that count is unknown; a conv map's spatial mean."""
    x = last_hidden_state
    if x.dim() == 4:  # [B, C, H, W]
        return x.mean(dim=(-2, -1))
    c = getattr(tower.config, "vision_config", None) or tower.config
    size, patch = getattr(c, "image_size", None), getattr(c, "patch_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    n = (int(size) // int(patch)) ** 2 if size and patch else 0
    return (x[:, -n:] if 0 < n <= x.shape[1] else x).mean(dim=1)


def tower_outputs(tower: nn.Module, pixel_values: torch.Tensor, patch_mean: bool = True):
    """(pooled feature, patch-token mean or None): pooled is the pooler output, else the first token."""
    out = tower(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.last_hidden_state[:, 0]
    mean = patch_token_mean(tower, out.last_hidden_state) if patch_mean else None
    return pooled.flatten(1), mean


def tower_features(tower: nn.Module, pixel_values: torch.Tensor, feature: str = "pooled") -> torch.Tensor:
    """What an image head reads: `pooled`, `patch_mean`, or `both` (concatenated, pooled first)."""
    pooled, mean = tower_outputs(tower, pixel_values, patch_mean=feature != "pooled")
    if feature == "pooled":
        return pooled
    return mean if feature == "patch_mean" else torch.cat([pooled, mean], dim=1)


def feature_width(tower: nn.Module, feature: str = "pooled") -> int:
    return tower_width(tower) * (2 if feature == "both" else 1)


def make_image_head(in_dim: int, embed_dim: int, layers: int = 1, hidden: int = 0) -> nn.Module:
    """layers=1: Linear(in_dim, embed_dim, no bias), the CLIP projection. layers=N>1: an MLP of N Linear layers
    (width `hidden`, default embed_dim) with LayerNorm + GELU between them, as ShareLock's projection."""
    if layers <= 1:
        return nn.Linear(in_dim, embed_dim, bias=False)
    width = hidden or embed_dim
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, width), nn.LayerNorm(width), nn.GELU()]
        d = width
    mods.append(nn.Linear(d, embed_dim))
    return nn.Sequential(*mods)
