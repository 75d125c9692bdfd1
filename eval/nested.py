"""Recall at each nested dim of a model trained with `model.nested_dims` (Matryoshka): image and caption
features cut to their first d values and re-normalised, then the same retrieval as at the full dim."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from l2c.eval.retrieval import CaptionGallery, evaluate_gallery


def cut(features: np.ndarray, dim: int) -> np.ndarray:
    """The d-dim embedding of L2-normalised features: their first `dim` values, re-normalised (float32)."""
    x = np.asarray(features[:, :dim], dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_by_dim(image_keys: list[str], image_feats: np.ndarray, texts: CaptionGallery, dims: list[int],
                  ks=(1, 5, 10), backend: str = "auto", allow_missing: bool = False) -> dict[str, dict]:  # fmt: skip
    """{"d": {"image_to_text": {"R@K": ...}, "text_to_image": {...}}} for each dim in `dims`: eval-retrieval's
    figures on the cut features (`evaluate_gallery`), per field left out."""
    out = {}
    for d in dims:
        cut_texts = replace(texts, feats=cut(texts.feats, d))
        r = evaluate_gallery(image_keys, cut(image_feats, d), cut_texts, list(ks), backend, allow_missing)
        out[str(d)] = {"image_to_text": r["image_to_text"], "text_to_image": r["text_to_image"]}
    return out
