"""The LLM2CLIP text adapter: residual MLP blocks on the (L2-normalised) cached LLM vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLP(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x)))): pre-LN, dim -> expansion*dim -> dim."""

    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class TextAdapter(nn.Module):
    """N residual MLP blocks, a final LayerNorm and a Linear to the joint embedding dim."""

    def __init__(self, text_dim: int, embed_dim: int, n_blocks: int = 4, expansion: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*[ResidualMLP(text_dim, expansion) for _ in range(n_blocks)])
        self.norm = nn.LayerNorm(text_dim)
        self.proj = nn.Linear(text_dim, embed_dim)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        x = F.normalize(vectors.float(), dim=-1)
        return self.proj(self.norm(self.blocks(x)))
