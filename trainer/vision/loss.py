"""Contrastive losses: symmetric CLIP InfoNCE and SigLIP's sigmoid loss, local loss + gather with grad."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from l2c.trainer.distributed import gather_no_grad, gather_with_grad, rank


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch; each rank scores its own rows against all gathered features.

    With `gather_with_grad` the mean of the per-rank losses (what DDP's gradient averaging optimises)
    equals the loss on the concatenated batch, and so do its gradients.
    """

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
        gather = gather_with_grad if self.gather_with_grad else gather_no_grad
        all_img, all_txt = gather(img), gather(txt)
        n = img.shape[0]
        labels = torch.arange(n, device=img.device) + rank() * n
        logits_per_image = scale * img @ all_txt.T
        logits_per_text = scale * txt @ all_img.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023): every image-text pair is a binary match/no-match decision."""

    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
        gather = gather_with_grad if self.gather_with_grad else gather_no_grad
        all_txt = gather(txt)
        n = img.shape[0]
        logits = scale * img @ all_txt.T + (bias if bias is not None else 0.0)
        labels = -torch.ones_like(logits)
        labels[torch.arange(n), torch.arange(n) + rank() * n] = 1.0
        return -F.logsigmoid(labels * logits).sum() / n


def make_loss(kind: str, gather_with_grad: bool = True) -> nn.Module:
    if kind == "clip":
        return ClipLoss(gather_with_grad)
    if kind == "siglip":
        return SigLipLoss(gather_with_grad)
    raise ValueError(f"unknown loss {kind!r} (clip or siglip)")
