"""Helpers for the eval tests: write real text caches (Parquet shards + manifest) from arrays."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from l2c.cache import Manifest, ShardEntry, build_table, write_shard_file

sys.path.insert(0, str(Path(__file__).parent))  # test modules import eval_reference


def write_cache(
    directory: Path | str,
    keys: list[str],
    fields: list[str],
    vecs: np.ndarray,
    fingerprint: str = "test-fingerprint",
    shard_rows: int = 0,
    store_dtype: str = "float32",
    teacher: dict | None = None,
) -> Path:
    """A text cache (a directory or an object-store URL) holding the given rows, in shards of `shard_rows` (0: one)."""
    from l2c.storage import Store

    Store(directory).makedirs()
    n = len(keys)
    step = shard_rows or max(n, 1)
    shards = {}
    for s, start in enumerate(range(0, n, step)):
        sl = slice(start, start + step)
        name = f"shard-{s:05d}"
        table = build_table(
            keys[sl], fields[sl], vecs[sl], [7] * len(keys[sl]), [False] * len(keys[sl]), store_dtype
        )
        rows, sha = write_shard_file(directory, f"{name}.parquet", table)
        shards[name] = ShardEntry(file=f"{name}.parquet", source=f"src-{s}", rows=rows, sha256=sha)
    settings = {
        "model": "test-model",
        "dim": int(vecs.shape[1]),
        "fields": list(dict.fromkeys(fields)),
        "model_fingerprint": fingerprint,
        "store_dtype": store_dtype,
        **(teacher or {}),
    }
    Manifest(settings=settings, shards=shards).save(directory)
    return directory


@pytest.fixture
def make_cache(tmp_path):
    counter = iter(range(1000))

    def make(keys, fields, vecs, **kw):
        return write_cache(
            tmp_path / f"cache-{next(counter)}", list(keys), list(fields), np.asarray(vecs), **kw
        )

    return make
