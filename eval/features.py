"""Image features from webdataset shards through an exported model's vision tower.

Samples are read in shard order with `l2c.data.shards.read_tar` (the reader embed-captions and train-vision
use); an image member (`jpg`, `jpeg`, `png`, `webp`, any case) is decoded with PIL, preprocessed by the model
and encoded in batches. Samples without an image, whose image does not decode, or that hold a member twice
are skipped and returned with the reason (callers report them); a key seen twice is an error.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l2c.data.images import sample_image
from l2c.eval.errors import EvalError


def expand_shards(specs: list[str] | str) -> list[str]:
    """Image tars as `train-vision` finds them: files, directories, globs, brace ranges, fsspec URLs."""
    from l2c.data.shards import expand_shards as expand

    try:
        return expand(specs, what="image shard")
    except FileNotFoundError as e:
        raise EvalError(f"no image shards found: {e}") from e


def count_samples(shards: list[str]) -> int | None:
    """Samples in local uncompressed tars, from their headers (for progress); None when not cheap to tell."""
    from l2c.data.shards import count_keys

    if not all(s.endswith(".tar") and Path(s).is_file() for s in shards):
        return None
    total = 0
    for s in shards:
        try:
            total += count_keys(s)
        except (OSError, tarfile.TarError) as e:  # empty, cut short or not a tar: one line naming it
            why = str(e).strip().splitlines()[-1].removeprefix("- method tar: ") if str(e).strip() else type(e).__name__
            what = "an empty file" if Path(s).stat().st_size == 0 else f"not a readable tar ({why})"
            raise EvalError(f"image shard {s} could not be read: {what}") from None
    return total


def iter_samples(shards: list[str], rejects: list | None = None) -> Iterator[dict]:
    """webdataset samples (`l2c.data.shards.Sample`: raw bytes by suffix, plus `__key__` and `__url__`) in
    shard order; samples the reader rejects (a member twice) are appended to `rejects`.

    An unreadable or damaged tar is an error naming it: evaluating on part of a test set would report
    figures of another set."""
    from l2c.data.shards import read_tar

    for url in shards:
        found: list = []
        yield from read_tar(url, found)
        bad = [r for r in found if r.reason == "unreadable_tar"]
        if bad:
            raise EvalError(f"image shard {url} could not be read whole: {bad[0].detail}")
        if rejects is not None:
            rejects += found


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

    rejects: list = []  # l2c.data.shards.TarReject of samples with a member twice
    for sample in iter_samples(shards, rejects):
        key = sample["__key__"]
        if key in seen:
            raise EvalError(f"duplicate image key {key!r} in {sample.get('__url__')} (first in {seen[key]})")
        seen[key] = sample.get("__url__", "")
        img, reason = sample_image(sample)
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
    skipped += [(r.key, f"{r.reason}: {r.detail}") for r in rejects]
    if not keys:
        raise EvalError(f"no decodable images in {len(shards)} shard(s) ({len(skipped)} samples skipped)")
    return ImageFeatures(keys, np.concatenate(parts).astype(np.float32), values, skipped)
