"""The join index behind `data.pairing=join`: a text cache's keys sorted, each key's row per field, and the
vectors as one memory-mapped float16 `.npy`, so tars whose captions were embedded apart from them are paired
by key. It is built once per cache (named by the cache's manifest: model fingerprint and every shard's
sha256) and kept:

- run directory on a filesystem (`--out /fsx/runs/x`): `OUT/pairing-index/KEY/`, built by rank 0 while the
  other ranks wait, reused by every later start (a resume), replaced when the cache changes;
- run directory in an object store (`--out s3://...`): `$L2C_STAGING_DIR/l2c-staging/pairing-index/KEY/` on each
  node's disk, built by the first rank of the node (the others wait on a file lock) and reused by later
  starts on that node.

Building it reads the whole cache (peak memory: the keys and one shard; the vectors go straight to disk), so
it is for small caches: above `data.join_max_rows` it is refused with the estimate and the command that aligns
the cache to the tars once, offline (`l2c align-cache`), after which pairing reads one shard per tar.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from l2c import atomic
from l2c.cache import CacheError, TextCache, embedding_matrix
from l2c.storage import RunDir, staging_root

INDEX_VERSION = 3
DIR = "pairing-index"
# The build's pace for the estimate, fitted on this project's 2-core machine (ensure() on bench_scale.py's caches:
# 0.5 s for 150k rows of 256-d, 5.5 s for 1.5M of 256-d, 5.1 s for 60k of 4,096-d): a little per row, mostly per
# byte of float16 vectors read, decoded and written.
ROWS_PER_S = 1_000_000
BYTES_PER_S = 100e6


def stamp(cache: TextCache) -> dict:
    """What the index is built from: the cache's vectors, as its manifest names them."""
    shards = {n: e.sha256 for n, e in sorted(cache.manifest.shards.items())}
    return {"version": INDEX_VERSION, "fingerprint": cache.fingerprint, "shards": shards}


def index_key(cache: TextCache) -> str:
    return hashlib.sha256(json.dumps(stamp(cache), sort_keys=True).encode()).hexdigest()[:16]


def estimate(cache: TextCache) -> dict:
    """Rows, bytes on disk and build time of the cache's join index, from its manifest (nothing read)."""
    rows = len(cache)
    nbytes = rows * cache.dim * 2
    return {"rows": rows, "bytes": nbytes, "seconds": rows / ROWS_PER_S + nbytes / BYTES_PER_S}


def align_command(cache: TextCache, images: str | list[str] | None) -> str:
    """The `l2c align-cache` command line that makes an aligned cache of `cache` for these tars."""
    tars = [images] if isinstance(images, str) else list(images or ["TARS"])
    args = " ".join(f"--images {shlex.quote(str(t))}" for t in tars)
    return f"l2c align-cache --text-cache {shlex.quote(cache.dir)} {args} --out DIR"


def check_size(cache: TextCache, max_rows: int, why: str, images: str | list[str] | None = None) -> dict:
    """The estimate; a `CacheError` (one line: `why`, the estimate, the align-cache command) above `max_rows`."""
    est = estimate(cache)
    if est["rows"] > max_rows:
        raise CacheError(
            f"{why} needs a join index of the whole text cache {cache.dir}: {est['rows']:,} rows, "
            f"~{_size(est['bytes'])} of vectors, ~{_duration(est['seconds'])} to build, above "
            f"data.join_max_rows={max_rows:,}. Align the cache to the tars once instead: "
            f"`{align_command(cache, images)}`, then train with --text-cache DIR"
        )
    return est


def _size(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def location(cache: TextCache, run: RunDir) -> Path:
    """Where this run keeps the cache's index (see the module docstring)."""
    base = staging_root() / DIR if run.remote else run.local / DIR
    return base / index_key(cache)


def is_current(d: Path, cache: TextCache) -> bool:
    try:
        meta = json.loads((d / "index.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    want = stamp(cache)
    return {k: meta.get(k) for k in want} == want


def prepare(cache: TextCache, run: RunDir, main: bool) -> tuple[Path, bool]:
    """This rank's index directory, and whether this rank built it now. Rank 0 builds a run directory's index
    (the caller's barrier keeps the other ranks waiting); with an object-store run, the first rank of each node."""
    d = location(cache, run)
    if run.remote:
        with node_lock(d.with_name(f".{d.name}.lock")):
            return d, ensure(cache, d)
    if not main:
        return d, False
    built = ensure(cache, d)
    for old in d.parent.iterdir():  # what earlier runs here built for other versions of the cache
        if old != d and (re.fullmatch(r"[0-9a-f]{16}", old.name) or old.name in LEGACY):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return d, built


LEGACY = ("index.json", "keys.npy", "rows.npy", "vectors.npy")  # the single index of earlier versions


@contextmanager
def node_lock(path: Path):
    """An exclusive lock among the processes of one machine (flock on a file beside the index)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(cache: TextCache, d: str | Path) -> bool:
    """Build the index in `d` unless it holds this cache's already; True when built now."""
    d = Path(d)
    if is_current(d, cache):
        return False
    with atomic.atomic_dir(d) as tmp:
        _write(cache, tmp)
    return True


def _write(cache: TextCache, out: Path) -> None:
    """Vectors appended shard by shard to the .npy (plain writes: no page of it stays in this process's memory);
    keys and fields kept as Arrow columns, then sorted and indexed."""
    from l2c.trainer.vision.pairing import check_finite

    n = len(cache)
    key_cols, field_cols, at = [], [], 0
    with open(out / "vectors.npy", "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, cache.dim)})
        for name, table in cache.iter_tables(["key", "field", "embedding"]):
            if at + table.num_rows > n or table.num_rows != cache.manifest.shards[name].rows:
                raise CacheError(f"text cache {cache.dir}: shard {name} holds {table.num_rows} rows, the manifest says "
                                 f"{cache.manifest.shards[name].rows}: the cache is damaged (`l2c cache-info` lists it)")  # fmt: skip
            vecs = embedding_matrix(table, np.float16)
            if not np.isfinite(vecs).all():
                check_finite(vecs, table.column("key").to_pylist(), table.column("field").to_pylist(),
                             f"text cache {cache.dir} shard {name}")  # fmt: skip
            f.write(np.ascontiguousarray(vecs, "<f2").tobytes())
            at += len(vecs)
            key_cols.append(table.column("key").combine_chunks())
            field_cols.append(table.column("field").combine_chunks().cast(pa.string()))
    keys = pa.chunked_array(key_cols, pa.string())
    flds = pa.chunked_array(field_cols, pa.string())
    ukeys = pc.unique(keys)
    ukeys = ukeys.take(pc.sort_indices(ukeys))  # byte order: what np.searchsorted on the encoded keys expects
    fields = pc.unique(flds)  # row field names in the order first met (`captions[0]`, `captions[1]`, ...)
    kpos = pc.index_in(keys, value_set=ukeys).to_numpy(zero_copy_only=False)
    fpos = pc.index_in(flds, value_set=fields).to_numpy(zero_copy_only=False)
    rows = np.full((len(ukeys), len(fields)), -1, dtype=np.int64)
    rows[kpos, fpos] = np.arange(n, dtype=np.int64)  # a key given one field twice keeps its last row
    enc = np.array([k.encode() for k in ukeys.to_pylist()], dtype=bytes) if len(ukeys) else np.zeros(0, "S1")
    for name, arr in (("keys", enc), ("rows", rows)):
        with open(out / f"{name}.npy", "wb") as f:
            np.save(f, arr)
    meta = {**stamp(cache), "fields": fields.to_pylist(), "n_keys": len(ukeys), "n_rows": n}
    (out / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
