"""Exact top-k inner-product search: faiss (GPU when available, else CPU) or a numpy reference.

Queries go through in batches, so memory stays at `batch x gallery` scores (numpy) or `batch x k`
results (faiss, which blocks the gallery itself); a gallery of a million 768-d vectors needs only the
gallery itself (3 GB float32) plus a few hundred MB.

>>> scores, idx = topk(queries, gallery, k=10)          # [nq, k] each, best first
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from l2c.errors import L2CError

Backend = Literal["auto", "faiss", "faiss-gpu", "numpy"]
NUMPY_BLOCK_BYTES = 256 << 20  # score block of the numpy backend: batch x gallery float32


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
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise SearchError(f"{name} must be a 2-d array [n, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
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


def _faiss_topk(q: np.ndarray, g: np.ndarray, k: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    if gpu:
        res = _gpu_resources()
        return faiss.knn_gpu(res, q, g, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(q, g, k, metric=faiss.METRIC_INNER_PRODUCT)


_GPU_RES = None


def _gpu_resources():
    global _GPU_RES
    if _GPU_RES is None:
        import faiss

        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def default_batch_size(backend: str, n_gallery: int) -> int:
    if backend == "numpy":
        return int(max(1, min(16384, NUMPY_BLOCK_BYTES // (4 * max(n_gallery, 1)))))
    return 16384


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
    `progress(n)` is called with the number of queries done after each batch.
    """
    q = _as_matrix(queries, "queries")
    g = _as_matrix(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise SearchError(f"queries have dim {q.shape[1]}, gallery has dim {g.shape[1]}")
    if g.shape[0] == 0:
        raise SearchError("the gallery is empty")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    k = min(k, g.shape[0])
    name = resolve_backend(backend)
    bs = batch_size or default_batch_size(name, g.shape[0])
    scores = np.empty((q.shape[0], k), np.float32)
    idx = np.empty((q.shape[0], k), np.int64)
    for start in range(0, q.shape[0], bs):
        qb = q[start : start + bs]
        if name == "numpy":
            s, i = _numpy_topk(qb, g, k)
        else:
            s, i = _faiss_topk(qb, g, k, gpu=name == "faiss-gpu")
        scores[start : start + len(qb)], idx[start : start + len(qb)] = s, i
        if progress is not None:
            progress(len(qb))
    return scores, idx
