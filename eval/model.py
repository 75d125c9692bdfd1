"""The trained model as eval sees it: loading an export, checking a text cache against it, adapting vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from l2c.cache import TextCache
from l2c.devices import pick_device
from l2c.eval.errors import EvalError
from l2c.meta import ModelMeta


def resolve_device(device: str = "auto") -> str:
    """`--device` as a string torch takes ("auto": the GPU if there is one)."""
    return str(pick_device(device))


def load_model(path: str | Path, device: str = "cpu"):
    """An exported model (RUN_DIR or RUN_DIR/export), or a released LLM2CLIP model directory (config.json naming
    LLM2CLIPModel, e.g. LLM2CLIP-Openai-L-14-336), in eval mode, with `.meta`."""
    from l2c.trainer.vision.export import load_exported
    from l2c.trainer.vision.released import is_released_dir, load_released

    try:
        return load_exported(path, device=device)
    except FileNotFoundError as e:
        if is_released_dir(path) or str(path).endswith((".pt", ".pth")):
            return load_released(path, device=device)
        raise EvalError(f"{e}; nor is it a released LLM2CLIP model directory (config.json naming LLM2CLIPModel)") from e


def check_cache_fits_model(cache: TextCache, meta: ModelMeta) -> None:
    """The cache must hold vectors of the teacher the model was trained on: same dim, same teacher identity
    (weights, pooling, prompt format, instruction, normalisation, max_length, dtypes, attention, engine)."""
    if cache.dim != meta.text_dim:
        trained_on = meta.teacher.model if meta.teacher else None
        raise EvalError(
            f"text cache {cache.dir} holds {cache.dim}-d vectors but the model's adapter takes {meta.text_dim}-d "
            f"vectors: the cache was made with another text encoder ({cache.teacher.model!r}; the model was trained "
            f"on {trained_on!r})"
        )
    if meta.teacher is not None:
        meta.teacher.check_same(cache.teacher, "the model", "the cache", f"text cache {cache.dir}",
                                "re-embed the eval captions with the model's teacher and settings (eval-suite does)")


def adapt_texts(
    model,
    vectors: np.ndarray,
    batch_size: int = 4096,
    progress: Callable[[int], None] | None = None,
    dtype=np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Cached text vectors through the model's adapter: [n, embed_dim], L2-normalised, as `dtype` (float16 keeps
    a large caption gallery at half the memory). A batch of `batch_size` rows at a time is float32; `out`: an
    array to write into instead of a new one (rows `[:n]` of a larger gallery)."""
    import torch

    device = next(model.parameters()).device
    if out is None:
        out = np.empty((len(vectors), model.meta.embed_dim), dtype)
    with torch.inference_mode():
        for start in range(0, len(vectors), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(vectors[start : start + batch_size], np.float32))
            out[start : start + len(x)] = model.encode_text(x.to(device)).float().cpu().numpy()
            if progress is not None:
                progress(len(x))
    return out
