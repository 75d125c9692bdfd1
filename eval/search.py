"""Exact top-k inner-product search: faiss (GPU when available, else CPU) or a numpy reference.

Queries and gallery may be float16 (how eval keeps caption features) or float32; neither is copied whole.
Queries go through in batches; the gallery is searched in blocks of `GALLERY_BLOCK_BYTES` as float32, each
block's top k merged into the batch's (best score first, ties by gallery index), so host memory is the arrays
themselves plus one float32 block and one batch of results. The numpy backend scores a block in sub-batches of
`NUMPY_BLOCK_BYTES`; faiss blocks its own work. `faiss-gpu` moves the gallery to the GPU once (a flat
inner-product index, float32) and searches every batch there. Non-finite values are refused, block by block.

>>> scores, idx = topk(queries, gallery, k=10)          # [nq, k] each, best first
>>> for start, scores, idx in iter_topk(queries, gallery, k=10): ...   # one query batch at a time
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np

from l2c.errors import L2CError

Backend = Literal["auto", "faiss", "faiss-gpu", "numpy"]
NUMPY_BLOCK_BYTES = 256 << 20  # score block of the numpy backend: batch x gallery float32
GALLERY_BLOCK_BYTES = 1 << 30  # gallery rows searched at once, as float32 (the whole gallery when it fits)


class SearchError(L2CError, ValueError):
    """Query and gallery that cannot be searched together (shape, dtype, k)."""


def faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: Backend = "auto") -> str:
    """`auto` → `faiss-gpu` when faiss-gpu sees a GPU, else `faiss` (CPU), else `numpy`."""
    if backend == "auto":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "numpy"
        return "faiss-gpu" if faiss_gpu_available() else "faiss"
    if backend == "faiss-gpu" and not faiss_gpu_available():
        raise SearchError("backend faiss-gpu asked for, but faiss has no GPU support here or sees no GPU")
    if backend not in ("faiss", "faiss-gpu", "numpy"):
        raise SearchError(f"unknown search backend {backend!r} (auto, faiss, faiss-gpu, numpy)")
    return backend


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """`x` as a float32 C-contiguous [n, dim] array (no copy when it is one), refused if it holds NaN or inf
    (checked in slices, so the check holds no temporary the size of `x`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise SearchError(f"{name} must be a 2-d array [n, dim], got shape {x.shape}")
    step = max(1, (64 << 20) // max(1, x.shape[1]))
    if not all(np.isfinite(x[i : i + step]).all() for i in range(0, len(x), step)):
        raise SearchError(f"{name} holds NaN or inf values")
    return x


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _numpy_topk(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ g.T
    if k < g.shape[0]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(g.shape[0]), scores.shape)
    part_scores = np.take_along_axis(scores, part, axis=1)
    # best score first; equal scores by gallery index, so the order is deterministic
    order = np.lexsort((part, -part_scores), axis=1)
    idx = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, idx, axis=1), idx.astype(np.int64)


def _faiss_topk(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn(q, g, k, metric=faiss.METRIC_INNER_PRODUCT)


_GPU_RES = None


def _gpu_resources():
    global _GPU_RES
    if _GPU_RES is None:
        import faiss

        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def default_batch_size(backend: str, n_gallery: int) -> int:
    """Queries scored at once against `n_gallery` rows (numpy: a `NUMPY_BLOCK_BYTES` score block)."""
    if backend == "numpy":
        return int(max(1, min(16384, NUMPY_BLOCK_BYTES // (4 * max(n_gallery, 1)))))
    return 16384


def _rows(x: np.ndarray, rows: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    return x[start:stop] if rows is None else x[rows[start:stop]]


class _Gallery:
    """The gallery as float32 blocks: made once when it is one block (or on the GPU), else per query batch."""

    def __init__(self, gallery: np.ndarray, rows: np.ndarray | None, backend: str):
        self.g, self.rows, self.backend = gallery, rows, backend
        self.block_rows = max(1, GALLERY_BLOCK_BYTES // (4 * gallery.shape[1]))
        self.starts = list(range(0, len(gallery) if rows is None else len(rows), self.block_rows))
        self.checked: set[int] = set()
        self.index = self.kept = None
        if backend == "faiss-gpu":
            self.index = _gpu_index(gallery.shape[1], (self._block(s) for s in self.starts))
        elif len(self.starts) == 1:
            self.kept = self._block(0)

    def _block(self, start: int) -> np.ndarray:
        b = _rows(self.g, self.rows, start, start + self.block_rows)
        if start in self.checked:
            return np.ascontiguousarray(b, dtype=np.float32)
        self.checked.add(start)
        return _as_matrix(b, "gallery")

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            return self.index.search(q, k)
        best = None
        for start in self.starts:
            g = self.kept if self.kept is not None else self._block(start)
            kb = min(k, len(g))
            if self.backend == "numpy":
                sub = default_batch_size("numpy", len(g))
                parts = [_numpy_topk(q[i : i + sub], g, kb) for i in range(0, len(q), sub)]
                s, i = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            else:
                s, i = _faiss_topk(q, g, kb)
            best = (s, i + start) if best is None else _merge(best, (s, i + start), k)
        return best


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int):
    """The k best of two top-k lists per query: highest score first, equal scores by gallery index."""
    s, i = np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1)
    order = np.lexsort((i, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def _gpu_index(dim: int, blocks):
    """A flat inner-product faiss index on GPU 0 holding the gallery (added a block at a time)."""
    import faiss

    cfg = faiss.GpuIndexFlatConfig()
    cfg.device = 0
    index = faiss.GpuIndexFlatIP(_gpu_resources(), dim, cfg)
    for b in blocks:
        index.add(b)
    return index


def iter_topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    backend: Backend = "auto",
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    query_rows: np.ndarray | None = None,
    gallery_rows: np.ndarray | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, scores float32 [b, k], indices int64 [b, k]) per batch of queries, in order: the `k` gallery rows
    with the largest inner product, best first (`k` clipped to the gallery). `query_rows` / `gallery_rows`:
    search those rows only (indices then count in `gallery_rows`), without copying the arrays."""
    if queries.ndim != 2 or gallery.ndim != 2:
        raise SearchError(f"queries and gallery must be 2-d arrays [n, dim], got shapes {queries.shape}, {gallery.shape}")
    if queries.shape[1] != gallery.shape[1]:
        raise SearchError(f"queries have dim {queries.shape[1]}, gallery has dim {gallery.shape[1]}")
    n_q = len(queries) if query_rows is None else len(query_rows)
    n_g = len(gallery) if gallery_rows is None else len(gallery_rows)
    if n_g == 0:
        raise SearchError("the gallery is empty")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    k = min(k, n_g)
    name = resolve_backend(backend)
    g = _Gallery(gallery, gallery_rows, name)
    bs = batch_size or (default_batch_size(name, n_g) if len(g.starts) == 1 and name == "numpy" else 16384)
    for start in range(0, n_q, bs):
        q = _as_matrix(_rows(queries, query_rows, start, start + bs), "queries")
        s, i = g.search(q, k)
        yield start, np.asarray(s, np.float32), np.asarray(i, np.int64)
        if progress is not None:
            progress(len(q))


def topk(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    backend: Backend = "auto",
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` gallery rows with the largest inner product for every query, best first.

    Returns (scores float32 [nq, k], indices int64 [nq, k]); `k` is clipped to the gallery size.
    `progress(n)` is called with the number of queries done after each batch (see `iter_topk`).
    """
    kk = min(k, len(gallery)) if gallery.ndim == 2 else k
    scores = np.empty((len(queries), max(kk, 0)), np.float32)
    idx = np.empty((len(queries), max(kk, 0)), np.int64)
    for start, s, i in iter_topk(queries, gallery, k, backend, batch_size, progress):
        scores[start : start + len(s)], idx[start : start + len(s)] = s, i
    return scores, idx
