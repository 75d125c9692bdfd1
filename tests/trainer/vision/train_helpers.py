"""Small real inputs for trainer tests: tiny random towers, webdataset tars, Parquet text caches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40), (200, 40, 220), (40, 220, 220)]
SHAPES = ["square", "disc"]


def class_image(cls: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """An image whose colour and shape encode class `cls` (len(COLOURS) * len(SHAPES) classes)."""
    colour, shape = COLOURS[cls % len(COLOURS)], SHAPES[cls // len(COLOURS) % len(SHAPES)]
    bg = tuple(int(x) for x in rng.integers(0, 60, 3))
    arr = np.zeros((size, size, 3), np.uint8) + np.array(bg, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    r = int(rng.integers(size // 5, size // 3))
    mask = (
        (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if shape == "disc"
        else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    )
    arr[mask] = colour
    arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_class_shards(
    out: Path, n_shards: int, per_shard: int, n_classes: int = 12, seed: int = 0, prefix: str = "shard"
) -> tuple[list[Path], dict[str, int]]:
    """Webdataset tars of class images; returns (tar paths, key -> class)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    labels: dict[str, int] = {}
    paths = []
    for s in range(n_shards):
        path = out / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                key = f"{prefix}{s:03d}_{i:05d}_s{seed}"
                cls = int(rng.integers(n_classes))
                labels[key] = cls
                w.write(
                    {
                        "__key__": key,
                        "jpg": jpeg_bytes(class_image(cls, rng)),
                        "txt": f"class {cls}",
                        "json": json.dumps({"label": cls, "long_caption": f"a picture of class {cls}"}),
                    }
                )
        paths.append(path)
    return paths, labels


def class_vectors(n_classes: int, dim: int, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_classes, dim)).astype(np.float32)


def write_cache(
    cache_dir: Path | str,
    shards: dict[str, tuple[str, list[tuple[str, str, np.ndarray]]]],
    dim: int,
    fields: list[str],
    fingerprint: str = "fp-test",
) -> Path:
    """A real text cache (a directory or an object-store URL): shards = {name: (source, [(key, field, vector)])}."""
    from l2c.cache import Manifest, ShardEntry, build_table, write_shard_file
    from l2c.storage import Store

    Store(cache_dir).makedirs()
    entries = {}
    for name, (source, rows) in shards.items():
        emb = np.stack([r[2] for r in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
        table = build_table(
            [r[0] for r in rows], [r[1] for r in rows], emb, [8] * len(rows), [False] * len(rows)
        )
        n, sha = write_shard_file(cache_dir, f"{name}.parquet", table)
        entries[name] = ShardEntry(file=f"{name}.parquet", source=str(source), rows=n, sha256=sha)
    settings = {
        "model": "test",
        "dim": dim,
        "fields": fields,
        "model_fingerprint": fingerprint,
        "store_dtype": "float16",
    }
    Manifest(settings=settings, shards=entries).save(cache_dir)
    return cache_dir


def class_cache_for(
    tars: list[Path],
    labels: dict[str, int],
    cache_dir: Path,
    vecs: np.ndarray,
    fields=("txt",),
    noise: float = 0.0,
    seed: int = 7,
) -> Path:
    """Shard-aligned cache: one Parquet per tar, rows in tar key order, vector = class vector (+ noise)."""
    from l2c.data.shards import read_tar

    rng = np.random.default_rng(seed)
    shards = {}
    for tar in tars:
        keys = [s["__key__"] for s in read_tar(str(tar))]
        rows = [
            (k, f, vecs[labels[k]] + noise * rng.standard_normal(vecs.shape[1]).astype(np.float32))
            for k in keys
            for f in fields
        ]
        shards[tar.name.split(".")[0]] = (str(tar.resolve()), rows)
    return write_cache(cache_dir, shards, vecs.shape[1], list(fields))


def save_tower(path: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A random-weight vision tower (TINY_VIT by default) and its image processor, saved as a model directory."""
    import torch

    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.tower import build_vision_tower

    torch.manual_seed(seed)
    tower, _, proc = build_vision_tower(VisionConfig(config=dict(config or TINY_VIT)))
    tower.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def image_tars(root: Path, n_shards: int = 3, per_shard: int = 10, bad: bool = True) -> list[Path]:
    """Class images; with `bad`, shard 1 holds a JPEG cut short (sample 3) and a sample with no image (sample 6)."""
    from tests.pipeline.conftest import write_tar

    rng = np.random.default_rng(1)
    out = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            sample = {"__key__": f"s{s}_{i:03d}", "txt": f"class {i % 4}", "json": {"label": i % 4}}
            if not (bad and s == 1 and i == 6):
                sample["jpg"] = jpeg_bytes(class_image(i % 4, rng))
            if bad and s == 1 and i == 3:
                sample["jpg"] = sample["jpg"][:40]
            samples.append(sample)
        out.append(write_tar(root / f"img-{s:03d}.tar", samples))
    return out
