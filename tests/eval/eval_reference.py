"""Plain reference implementations and small real inputs (webdataset tars, exported models) for eval tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY_VIT = {
    "model_type": "vit",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
KINDS = ["circle", "square", "triangle"]


def reference_recall(image_feats, text_feats, text_image, ks):
    """Rank = how many gallery items score strictly above the best positive (exact on tie-free data)."""
    s = image_feats.astype(np.float64) @ text_feats.astype(np.float64).T  # [images, texts]
    n_img = len(image_feats)
    pos = text_image[None, :] == np.arange(n_img)[:, None]
    best_pos = np.where(pos, s, -np.inf).max(axis=1)
    i2t_rank = (s > best_pos[:, None]).sum(axis=1)
    t2i_rank = (s.T > s.T[np.arange(len(text_image)), text_image][:, None]).sum(axis=1)
    i2t = {f"R@{k}": 100.0 * np.mean(i2t_rank < k) for k in ks}
    t2i = {f"R@{k}": 100.0 * np.mean(t2i_rank < k) for k in ks}
    return i2t, t2i


def shape_image(kind: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 80, 3).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c, r = size // 2, size // 3
    if kind == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= r * r
    elif kind == "square":
        mask = (abs(yy - c) <= r) & (abs(xx - c) <= r)
    else:
        mask = (yy >= c - r) & (yy <= c + r) & (abs(xx - c) <= (yy - (c - r)) / 2)
    arr[mask] = rng.integers(120, 255, 3).astype(np.uint8)
    return Image.fromarray(arr)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(
    out: Path, n_shards: int, per_shard: int, seed: int = 0, extra: dict | None = None
) -> list[dict]:
    """Webdataset tars `out/shard-00000.tar`...: jpg + txt + json {label, long_caption}. Returns the samples."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"shard-{s:05d}.tar")) as w:
            for i in range(per_shard):
                kind = KINDS[(s * per_shard + i) % len(KINDS)]
                key = f"s{s}-{i:04d}"
                sample = {
                    "__key__": key,
                    "jpg": jpeg(shape_image(kind, rng)),
                    "txt": f"a {kind}",
                    "json": json.dumps({"label": kind, "long_caption": f"a picture of one {kind}"}).encode(),
                    **(extra or {}).get(key, {}),
                }
                w.write(sample)
                samples.append({"key": key, "label": kind})
    return samples


def export_tiny_model(
    run_dir: Path, text_dim: int, settings: dict, embed_dim: int = 24, seed: int = 0
) -> Path:
    """A real exported model (random tiny ViT + adapter) under `run_dir/export`, trained on a cache with `settings`."""
    import torch

    from l2c.teacher import TeacherSpec
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.export import export_model
    from l2c.trainer.vision.model import L2CModel
    from l2c.trainer.vision.tower import build_vision_tower

    torch.manual_seed(seed)
    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_VIT)))
    model = L2CModel(tower, spec, text_dim=text_dim, embed_dim=embed_dim, n_blocks=1, expansion=2).eval()
    return export_model(model, run_dir / "export", proc, TeacherSpec.from_dict(settings), settings.get("fields"))


def features_by_hand(export_dir: Path, shard_paths: list[Path]):
    """Image features computed straight from the tar members with PIL and the loaded model."""
    import tarfile

    import torch

    from l2c.trainer.vision.export import load_exported

    m = load_exported(export_dir)
    keys, feats = [], []
    for p in shard_paths:
        with tarfile.open(p) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tf.extractfile(member).read())).convert("RGB")
                    with torch.no_grad():
                        feats.append(m.encode_image(m.preprocess(img)[None])[0].numpy())
                    keys.append(member.name[: -len(".jpg")])
    return m, keys, np.stack(feats)
