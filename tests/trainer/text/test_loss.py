"""InfoNCE against an independent float64 reference; same-image captions never act as negatives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from l2c.trainer.text.loss import info_nce, pair_accuracy


def reference_loss(a: np.ndarray, b: np.ndarray, t: float, group: list[int] | None, symmetric: bool) -> float:
    """Loop-by-loop float64 InfoNCE: -log exp(s_ii/t) / sum over allowed j of exp(s_ij/t)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)

    def one_way(x, y):
        total = 0.0
        for i in range(n):
            denom = 0.0
            for j in range(n):
                if j != i and group is not None and group[i] == group[j]:
                    continue
                denom += math.exp(float(x[i] @ y[j]) / t)
            total += -(float(x[i] @ y[i]) / t - math.log(denom))
        return total / n

    return (one_way(a, b) + one_way(b, a)) / 2 if symmetric else one_way(a, b)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_loss_equals_reference(symmetric, temperature):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 16)), rng.normal(size=(7, 16))
    got = info_nce(torch.tensor(a), torch.tensor(b), temperature, symmetric=symmetric).item()
    assert got == pytest.approx(reference_loss(a, b, temperature, None, symmetric), rel=1e-5)


def test_masked_loss_equals_reference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    group = [0, 1, 0, 2, 3, 1]
    got = info_nce(torch.tensor(a), torch.tensor(b), 0.1, torch.tensor(group), symmetric=True).item()
    assert got == pytest.approx(reference_loss(a, b, 0.1, group, True), rel=1e-5)


def test_same_image_captions_are_not_negatives():
    """Planted batch: pairs 0 and 1 are two caption pairs of one image, all four captions the same direction.
    Masked, b_1 is no negative for a_0 (nor b_0 for a_1): rows 0 and 1 lose log(1 + 2 e^(-1/T)), rows 2 and 3
    (three orthogonal negatives) log(1 + 3 e^(-1/T)). Unmasked, rows 0 and 1 each see a negative as similar
    as their positive: log(2 + 2 e^(-1/T))."""
    t = 0.5  # the loss is computed in float32: keep e^(-1/T) well above its resolution
    e = torch.eye(3, dtype=torch.float64)
    a = torch.stack([e[0], e[0], e[1], e[2]])
    b = a.clone()
    group = torch.tensor([5, 5, 6, 7])
    eps = math.exp(-1 / t)
    masked = info_nce(a, b, t, group, symmetric=True).item()
    unmasked = info_nce(a, b, t, None, symmetric=True).item()
    assert masked == pytest.approx((2 * math.log(1 + 2 * eps) + 2 * math.log(1 + 3 * eps)) / 4, rel=1e-6)
    want_unmasked = (2 * math.log(2 + 2 * eps) + 2 * math.log(1 + 3 * eps)) / 4
    assert unmasked == pytest.approx(want_unmasked, rel=1e-6)


def test_pair_accuracy_respects_mask():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.02], [1.0, 0.0], [0.0, 1.0]])
    # a_0 is nearest to b_1 unless 0 and 1 share an image
    assert pair_accuracy(a, b) == pytest.approx(1 / 3)
    assert pair_accuracy(a, b, torch.tensor([0, 0, 1])) == pytest.approx(1.0)
