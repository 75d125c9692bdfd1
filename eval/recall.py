"""Recall@K from top-k search results, with the protocol of CLIP_benchmark.

Every query and every gallery item belongs to a group (an image): a query is found at K when one of
its top-K gallery items is in its group. Image→text: the query is an image, the gallery its captions
(found if any caption is in the top K). Text→image: the query is a caption, the gallery the images.
"""

from __future__ import annotations

import numpy as np


def first_hit_ranks(topk_idx: np.ndarray, gallery_group: np.ndarray, query_group: np.ndarray) -> np.ndarray:
    """0-based rank of the first gallery item in the query's group; `topk_idx.shape[1]` when none is there."""
    topk_idx = np.asarray(topk_idx)
    if topk_idx.shape[0] != len(query_group):
        raise ValueError(f"{topk_idx.shape[0]} result rows for {len(query_group)} queries")
    hits = np.asarray(gallery_group)[topk_idx] == np.asarray(query_group)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), topk_idx.shape[1])


def recall_at(ranks: np.ndarray, ks) -> dict[str, float]:
    """{"R@K": percentage of queries whose first hit has rank < K}."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {f"R@{k}": float("nan") for k in ks}
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def recall_curve(ranks: np.ndarray, kmax: int) -> list[float]:
    """Recall (percent) at K = 1..kmax."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return [float("nan")] * kmax
    counts = np.bincount(np.minimum(ranks, kmax), minlength=kmax + 1)[:kmax]
    return [float(v) for v in 100.0 * np.cumsum(counts) / len(ranks)]


def parse_ks(spec: str | list[int]) -> list[int]:
    """`"1,5,10"` → [1, 5, 10] (sorted, unique, each >= 1)."""
    if isinstance(spec, str):
        try:
            ks = [int(p) for p in spec.replace(" ", "").split(",") if p]
        except ValueError:
            raise ValueError(f"--k must be a comma-separated list of integers, got {spec!r}") from None
    else:
        ks = [int(k) for k in spec]
    if not ks or min(ks) < 1:
        raise ValueError(f"--k needs positive integers, got {spec!r}")
    return sorted(set(ks))
