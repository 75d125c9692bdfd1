"""The image-feature cache format (`l2c embed-images`): a frozen vision tower's features per image.

Same layout, manifest, journal and atomic shards as the text cache (`l2c.cache`)::

    DIR/manifest.json          format `l2c-image-cache`, settings (tower, fingerprint, preprocessing, dim), shards
    DIR/<shard>.parquet        key: string, embedding: fixed_size_list<float32|float16>[dim] (the pooled
                               feature), and with `patch_mean` in the settings also patch_mean: the same type
                               (the mean of the last layer's patch tokens); rows in the tar's key order
    DIR/rejected/<shard>.jsonl samples that got no feature: {key, reason, detail, source, position}

A reject's `position` is the sample's index in the tar's sample order (what `l2c.data.shards.read_tar`
yields), None for what the tar reader itself rejected (`duplicate_member`, `unreadable_tar`). With it,
`ImageCache.samples` gives back the tar's sample sequence, so training from the cache sees the very items,
in the very order, that training on the tar would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from l2c.cache import (
    IMAGE_FORMAT_NAME,
    REJECTED_DIR,
    STORE_DTYPES,
    CacheError,
    Manifest,
    TextCache,
    embedding_matrix,
    embeddings_to_arrow,
    open_cache_store,
)
from l2c.data.images import TOO_LARGE
from l2c.storage import Store

FEATURES = (
    "pooled",
    "patch_mean",
    "both",
)  # what a head trains on: pooled, the patch-token mean, or both joined
SAMPLE_REJECTS = ("missing_image", "corrupt_image", TOO_LARGE)  # rejects with a position in the tar's sample order


def image_schema(dim: int, store_dtype: str = "float32", patch_mean: bool = False) -> pa.Schema:
    if store_dtype not in STORE_DTYPES:
        raise CacheError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    vec = pa.list_(STORE_DTYPES[store_dtype], dim)
    fields = [pa.field("key", pa.string(), nullable=False), pa.field("embedding", vec, nullable=False)]
    if patch_mean:
        fields.append(pa.field("patch_mean", vec, nullable=False))
    return pa.schema(fields)


def build_image_table(
    keys: list[str], pooled: np.ndarray, patch_mean: np.ndarray | None, store_dtype: str
) -> pa.Table:
    """One shard's rows as an Arrow table with the image-cache schema."""
    n = len(keys)
    if pooled.shape[0] != n or (patch_mean is not None and patch_mean.shape != pooled.shape):
        raise CacheError(f"rows disagree: {n} keys, pooled {pooled.shape}, patch mean "
                         f"{None if patch_mean is None else patch_mean.shape}")  # fmt: skip
    cols = [pa.array(keys, pa.string()), embeddings_to_arrow(pooled, store_dtype)]
    if patch_mean is not None:
        cols.append(embeddings_to_arrow(patch_mean, store_dtype))
    return pa.Table.from_arrays(
        cols, schema=image_schema(pooled.shape[1], store_dtype, patch_mean is not None)
    )


class ImageCache(TextCache):
    """Read access to an image-feature cache (shard listing, validation and dims as for `TextCache`).

    >>> cache = ImageCache("image-cache/")
    >>> cache.dim, cache.fingerprint, len(cache)
    >>> keys, feats = cache.features("shard-000000", "pooled")   # rows in tar key order
    """

    FORMAT = IMAGE_FORMAT_NAME

    def schema(self) -> pa.Schema:
        return image_schema(self.dim, self.settings.get("store_dtype", "float32"), self.has_patch_mean)

    @property
    def has_patch_mean(self) -> bool:
        return bool(self.settings.get("patch_mean"))

    def feature_dim(self, feature: str) -> int:
        """Width of what a head gets for `feature` (pooled, patch_mean, or both concatenated)."""
        self.check_feature(feature)
        return self.dim * (2 if feature == "both" else 1)

    def check_feature(self, feature: str) -> None:
        if feature not in FEATURES:
            raise CacheError(f"image feature must be one of {FEATURES}, got {feature!r}")
        if feature != "pooled" and not self.has_patch_mean:
            raise CacheError(
                f"image cache {self.dir} holds no patch-token means (model.vision.feature={feature}); "
                "re-embed with `l2c embed-images --patch-mean`"
            )

    def features(self, name: str, feature: str = "pooled") -> tuple[list[str], np.ndarray]:
        """(keys, float32 [rows, feature_dim]) of one shard, rows in tar key order."""
        self.check_feature(feature)
        cols = ["key", "embedding"] + (["patch_mean"] if feature != "pooled" else [])
        t = self.read_shard(name, cols)
        keys = t.column("key").to_pylist()
        pooled = embedding_matrix(t)
        if feature == "pooled":
            return keys, pooled
        mean = embedding_matrix(t.select(["patch_mean"]).rename_columns(["embedding"]))
        return keys, mean if feature == "patch_mean" else np.concatenate([pooled, mean], axis=1)

    def load(self, feature: str = "pooled", dtype=np.float32) -> tuple[list[str], np.ndarray]:
        """Every shard's (keys, features [rows, feature_dim]), concatenated in shard-name order."""
        keys: list[str] = []
        parts = [np.zeros((0, self.feature_dim(feature)), dtype)]
        for name in self.shard_names:
            k, f = self.features(name, feature)
            keys += k
            parts.append(f.astype(dtype, copy=False))
        return keys, np.concatenate(parts)

    def shard_rejects(self, name: str) -> list[dict]:
        path = f"{REJECTED_DIR}/{name}.jsonl"
        if not self.store.exists(path):
            return []
        return [json.loads(line) for line in self.store.read_text(path).splitlines() if line.strip()]

    def samples(self, name: str, feature: str = "pooled") -> tuple[list[dict], list[dict]]:
        """(the tar's samples in order, tar-level rejects): each sample `{"__key__", "__features__"}` with its
        feature vector, None for an image that did not decode (`__reject__` says why: corrupt_image,
        image_too_large), no `__features__` for a sample without image."""
        keys, feats = self.features(name, feature)
        rejects = self.shard_rejects(name)
        placed = sorted((r for r in rejects if r.get("position") is not None), key=lambda r: r["position"])
        out: list[dict] = []
        row = 0
        for r in placed:
            while len(out) < r["position"] and row < len(keys):
                out.append({"__key__": keys[row], "__features__": feats[row]})
                row += 1
            out.append(
                {"__key__": r["key"]}
                if r["reason"] == "missing_image"
                else {"__key__": r["key"], "__features__": None, "__reject__": r["reason"]}
            )
        out += [{"__key__": k, "__features__": feats[i]} for i, k in enumerate(keys[row:], row)]
        return out, [r for r in rejects if r.get("position") is None]

    def keys(self) -> set[str]:
        """Every key with a feature (reads only the key column)."""
        out: set[str] = set()
        for _, t in self.iter_tables(["key"]):
            out.update(t.column("key").to_pylist())
        return out


def open_cache(directory: str | Path | Store) -> TextCache:
    """A text or an image cache, whichever `directory` holds."""
    store = open_cache_store(directory)
    manifest = Manifest.load(store)
    return (ImageCache if manifest.format == IMAGE_FORMAT_NAME else TextCache)(store)
