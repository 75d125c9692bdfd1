"""The trained model: vision tower + linear projection, LLM2CLIP text adapter, learnable logit scale."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from l2c.trainer.vision.adapter import TextAdapter
from l2c.trainer.vision.head import feature_width, make_image_head, tower_features
from l2c.trainer.vision.tower import ImageSpec


class L2CModel(nn.Module):
    """Image side: tower -> pooled (or patch mean) -> head (Linear(embed_dim), or an MLP). Text side: adapter on
    the cached vector. A `frozen` tower stays in eval mode without gradients; its features may come cached."""

    def __init__(
        self,
        tower: nn.Module,
        image_spec: ImageSpec,
        text_dim: int,
        embed_dim: int,
        n_blocks: int = 4,
        expansion: int = 2,
        logit_scale_init: float = 1 / 0.07,
        logit_scale_max: float = 100.0,
        logit_bias_init: float | None = None,
        frozen: bool = False,
        feature: str = "pooled",
        head_layers: int = 1,
        head_hidden: int = 0,
        nested_dims: list[int] | None = None,
    ):
        super().__init__()
        self.tower = tower
        self.frozen, self.feature = frozen, feature
        self.image_head_shape = {"feature": feature, "layers": head_layers, "hidden": head_hidden}
        if frozen:
            tower.requires_grad_(False)
            tower.eval()
        self.image_spec = image_spec
        self.text_dim, self.embed_dim = text_dim, embed_dim
        self.nested_dims = list(nested_dims or [])  # Matryoshka prefixes the loss was taken at (the export records them)
        self.adapter_shape = {"n_blocks": n_blocks, "expansion": expansion}
        self.visual_proj = make_image_head(feature_width(tower, feature), embed_dim, head_layers, head_hidden)
        self.adapter = TextAdapter(text_dim, embed_dim, n_blocks, expansion)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.logit_scale_max = logit_scale_max
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(logit_bias_init))) if logit_bias_init is not None else None
        )

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the tower: projection, adapter, logit scale (and bias)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("tower.")}

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.logit_scale_max)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.tower.eval()  # a frozen tower computes what its cached features hold (no dropout)
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's features the head reads (what `l2c embed-images` caches for a frozen tower)."""
        with torch.no_grad() if self.frozen else nullcontext():
            return tower_features(self.tower, pixel_values, self.feature)

    def encode_features(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual_proj(features)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode_features(self.image_features(pixel_values), normalize)

    def encode_text(self, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.adapter(vectors)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def forward(self, pixel_values: torch.Tensor | None, vectors: torch.Tensor, features: torch.Tensor | None = None,
                normalize: bool = True):  # fmt: skip
        """(image features, text features, logit scale, logit bias or None); features L2-normalised unless
        `normalize` is false (a nested loss cuts them first). Cached tower `features` (a frozen tower) stand in
        for `pixel_values`."""
        if features is not None:
            img = self.encode_features(features, normalize)
        else:
            img = self.encode_image(pixel_values, normalize)
        return img, self.encode_text(vectors, normalize), self.scale(), self.logit_bias
