"""Supervised SimCSE / InfoNCE with in-batch negatives, never counting same-image captions as negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_group_mask(group: torch.Tensor) -> torch.Tensor:
    """[B, B] True where i != j share a group: pairs that must not serve as each other's negatives."""
    same = group[:, None] == group[None, :]
    return same & ~torch.eye(len(group), dtype=torch.bool, device=group.device)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.05,
    group: torch.Tensor | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """Cross-entropy of cos(a_i, b_j) / T picking j = i among the batch.

    `group[i] == group[j]` (i != j) removes b_j from a_i's negatives (and a_j from b_i's when symmetric).
    Computed in float32 whatever the embeddings' dtype.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    if group is not None:
        logits = logits.masked_fill(same_group_mask(group.to(logits.device)), float("-inf"))
    labels = torch.arange(len(a), device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


def pair_accuracy(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor | None = None) -> float:
    """Fraction of a_i whose nearest b (among allowed candidates) is b_i: a cheap in-batch training signal."""
    with torch.no_grad():
        sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
        if group is not None:
            sim = sim.masked_fill(same_group_mask(group.to(sim.device)), float("-inf"))
        return (sim.argmax(1) == torch.arange(len(a), device=sim.device)).float().mean().item()
