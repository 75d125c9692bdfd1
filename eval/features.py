"""Image features from webdataset shards through an exported model's vision tower.

Samples are read in shard order; an image member (`jpg`, `jpeg`, `png`, `webp`) is decoded with PIL,
preprocessed by the model and encoded in batches. Samples without an image or whose image does not
decode are skipped and returned with the reason (callers report them); a key seen twice is an error.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l2c.eval.errors import EvalError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(specs: list[str] | str) -> list[str]:
    """Image tars as `train-vision` finds them: files, directories, globs, brace ranges, fsspec URLs."""
    from l2c.trainer.vision.data import expand_shards as expand

    try:
        return expand(specs)
    except FileNotFoundError as e:
        raise EvalError(f"no image shards found: {e}") from e


def count_samples(shards: list[str]) -> int | None:
    """Samples in local uncompressed tars, from their headers (for progress); None when not cheap to tell."""
    import tarfile

    if not all(s.endswith(".tar") and Path(s).is_file() for s in shards):
        return None
    keys = set()
    for s in shards:
        with tarfile.open(s) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    folder, _, base = m.name.rpartition("/")
                    keys.add((s, folder, base.split(".")[0]))  # webdataset's sample key
    return len(keys)


def iter_samples(shards: list[str]) -> Iterator[dict]:
    """webdataset samples (dicts of raw bytes by extension, plus `__key__` and `__url__`) in shard order.

    Read with the trainer's reader (local paths, `pipe:`, fsspec URLs); an unreadable or damaged tar is an
    error naming it: evaluating on part of a test set would report figures of another set."""
    from l2c.trainer.vision.data import read_tar

    for url in shards:
        errors: list[str] = []
        yield from read_tar(url, errors)
        if errors:
            raise EvalError(f"image shard {url} could not be read whole: {errors[0]}")


def sample_field(sample: dict, spec: str):
    """The value named by `spec` in a sample: a member (`txt`, `cls`) or a key of its json (`json:label`)."""
    if spec.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            return None
        doc = json.loads(raw)
        for part in spec[len("json:") :].split("."):
            if not isinstance(doc, dict) or part not in doc:
                return None
            doc = doc[part]
        return doc
    raw = sample.get(spec)
    if raw is None:
        return None
    return raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw


def decode_image(sample: dict):
    """(PIL RGB image, None) or (None, reason)."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return None, f"no image member (has {members})"
    try:
        with Image.open(io.BytesIO(sample[ext])) as im:
            return im.convert("RGB"), None
    except Exception as e:  # truncated or not an image
        return None, f"{ext} does not decode: {type(e).__name__}: {e}"


@dataclass
class ImageFeatures:
    keys: list[str]
    features: np.ndarray  # [n, embed_dim] float32, L2-normalised by the model
    values: dict[str, list] = field(default_factory=dict)  # extra sample fields asked for, per kept sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def extract_image_features(
    model,
    shards: list[str],
    batch_size: int = 64,
    device: str = "cpu",
    fields: tuple[str, ...] = (),
    progress: Callable[[int], None] | None = None,
) -> ImageFeatures:
    """Encode every image in `shards` with `model.encode_image(model.preprocess(img))`."""
    import torch

    keys: list[str] = []
    seen: dict[str, str] = {}
    values: dict[str, list] = {f: [] for f in fields}
    skipped: list[tuple[str, str]] = []
    parts: list[np.ndarray] = []
    batch: list = []

    def flush():
        if not batch:
            return
        with torch.inference_mode():
            x = torch.stack(batch).to(device)
            parts.append(model.encode_image(x).float().cpu().numpy())
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for sample in iter_samples(shards):
        key = sample["__key__"]
        if key in seen:
            raise EvalError(f"duplicate image key {key!r} in {sample.get('__url__')} (first in {seen[key]})")
        seen[key] = sample.get("__url__", "")
        img, reason = decode_image(sample)
        if img is None:
            skipped.append((key, reason))
            continue
        keys.append(key)
        for f in fields:
            values[f].append(sample_field(sample, f))
        batch.append(model.preprocess(img))
        if len(batch) >= batch_size:
            flush()
    flush()
    if not keys:
        raise EvalError(f"no decodable images in {len(shards)} shard(s) ({len(skipped)} samples skipped)")
    return ImageFeatures(keys, np.concatenate(parts).astype(np.float32), values, skipped)
