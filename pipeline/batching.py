"""Token-budget batching: sort captions by length so each batch pads little, and cap padded tokens."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def token_budget_batches(lengths, batch_tokens: int = 16384, max_batch_size: int = 512) -> Iterator[np.ndarray]:
    """Yield index arrays; each batch's (longest length × size) stays within `batch_tokens`.

    Captions are visited longest first, so the first batch is the largest in memory (an OOM shows at once).
    A caption longer than the budget gets a batch of its own.
    """
    lengths = np.asarray(lengths, np.int64)
    if batch_tokens < 1 or max_batch_size < 1:
        raise ValueError("batch_tokens and max_batch_size must be positive")
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, min(max_batch_size, batch_tokens // max(longest, 1)))
        yield order[start : start + size]
        start += size


def padding_fraction(lengths, batches) -> float:
    """Share of the padded token grid that is padding, for the given batches."""
    lengths = np.asarray(lengths, np.int64)
    real = sum(int(lengths[b].sum()) for b in batches)
    grid = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 0.0 if grid == 0 else 1.0 - real / grid
