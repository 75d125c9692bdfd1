"""The trained model as eval sees it: loading an export, checking a text cache against it, adapting vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from l2c.cache import TextCache
from l2c.devices import pick_device
from l2c.eval.errors import EvalError


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


def check_cache_fits_model(cache: TextCache, meta: dict) -> None:
    """The cache must hold vectors of the encoder the model was trained on: same dim, same fingerprint."""
    if cache.dim != int(meta["text_dim"]):
        raise EvalError(
            f"text cache {cache.dir} holds {cache.dim}-d vectors but the model's adapter takes "
            f"{meta['text_dim']}-d vectors: the cache was made with another text encoder "
            f"({cache.settings.get('model')!r}; the model was trained on {meta.get('text_encoder', {}).get('model')!r})"
        )
    want = meta.get("text_cache_fingerprint", "")
    if want and cache.fingerprint != want:
        raise EvalError(
            f"text cache {cache.dir} was embedded with fingerprint {cache.fingerprint[:16]}… "
            f"({cache.settings.get('model')!r}) but the model was trained on a cache with fingerprint "
            f"{want[:16]}… ({meta.get('text_encoder', {}).get('model')!r}). Re-embed the eval captions with "
            "the same text encoder and settings (model, pooling, normalize, instruction, max_length)."
        )


def adapt_texts(
    model,
    vectors: np.ndarray,
    batch_size: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Cached text vectors through the model's adapter: float32 [n, embed_dim], L2-normalised."""
    import torch

    device = next(model.parameters()).device
    out = np.empty((len(vectors), int(model.meta["embed_dim"])), np.float32)
    with torch.inference_mode():
        for start in range(0, len(vectors), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(vectors[start : start + batch_size], np.float32))
            out[start : start + len(x)] = model.encode_text(x.to(device)).float().cpu().numpy()
            if progress is not None:
                progress(len(x))
    return out
