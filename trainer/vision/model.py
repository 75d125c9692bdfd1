"""The trained model: vision tower + linear projection, LLM2CLIP text adapter, learnable logit scale."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from l2c.trainer.vision.adapter import TextAdapter
from l2c.trainer.vision.tower import ImageSpec, pooled_output, tower_width


class L2CModel(nn.Module):
    """Image side: tower -> pooled -> Linear(embed_dim). Text side: adapter on the cached vector."""

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
    ):
        super().__init__()
        self.tower = tower
        self.image_spec = image_spec
        self.text_dim, self.embed_dim = text_dim, embed_dim
        self.adapter_shape = {"n_blocks": n_blocks, "expansion": expansion}
        self.visual_proj = nn.Linear(tower_width(tower), embed_dim, bias=False)
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

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual_proj(pooled_output(self.tower, pixel_values))
        return F.normalize(x.float(), dim=-1) if normalize else x

    def encode_text(self, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.adapter(vectors)
        return F.normalize(x.float(), dim=-1) if normalize else x

    def forward(self, pixel_values: torch.Tensor, vectors: torch.Tensor):
        """(image features, text features, logit scale, logit bias or None); features L2-normalised."""
        return self.encode_image(pixel_values), self.encode_text(vectors), self.scale(), self.logit_bias
