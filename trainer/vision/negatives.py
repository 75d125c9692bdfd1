"""Mined neighbours as extra gallery texts (`loss.hard_negatives=N`): for each image of a step, a caption of N of
its key's nearest other keys (`l2c mine-negatives`), drawn with the sample's seeded generator from the k mined
(each neighbour's field drawn among the used ones), joins the image→text gallery as a negative.

A neighbour's captions are looked up by key in the cache's join index (`join_index.py`: sorted keys, each
field's row, the vectors as a memory-mapped .npy; the one join pairing uses, built once, refused above
`data.join_max_rows`). Beside it, `neighbors.npy` holds for each of its keys the positions of the key's
neighbours (-1 past the last; keys x k x 4 bytes: 6,000 x 16 x 4 = 384 kB on the photo demo), written from the
negatives shard by shard after checking they were mined from this very cache (every shard's sha256). Data
workers map both files, so a draw reads one row and N vectors.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from l2c import atomic
from l2c.cache import TextCache
from l2c.pipeline.negatives import NegativesError, cache_state, read_meta
from l2c.storage import RunDir
from l2c.trainer.vision import join_index
from l2c.trainer.vision.pairing import Pairing

TABLE, STAMP = "neighbors.npy", "neighbors.json"


class NegativeBank:
    """Captions of each key's mined neighbours, looked up by key (picklable: files are mapped on first use)."""

    def __init__(self, cache_dir: str, fields: list[str], index_dir: str | Path):
        self.vectors = Pairing(cache_dir, fields, index_dir=index_dir)
        self.index_dir, self.table = str(index_dir), str(Path(index_dir) / TABLE)
        self._maps: tuple | None = None

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None:
            self._maps = (np.load(Path(self.index_dir) / "keys.npy", mmap_mode="r"), np.load(self.table, mmap_mode="r"))
        return self._maps

    def draw(self, key: str, n: int, rng: random.Random) -> list[tuple[str, np.ndarray]]:
        """(neighbour key, one of its caption vectors) for up to `n` of `key`'s neighbours."""
        keys, table = self._load()
        k = key.encode()
        i = int(np.searchsorted(keys, k))
        if n < 1 or i >= len(keys) or keys[i] != k:
            return []
        row = table[i]
        cand = row[row >= 0]
        out = []
        for j in sorted(rng.sample(range(len(cand)), min(n, len(cand)))):
            other = keys[int(cand[j])].decode()
            choices = self.vectors.lookup(other)
            if choices:
                name = rng.choice(sorted(choices))
                out.append((other, choices[name]))
        return out


def plan_negatives(cache: TextCache, negatives: str | Path, run: RunDir, fields: list[str], main: bool,
                   max_rows: int) -> NegativeBank:  # fmt: skip
    """The bank for this run. Its tables are built as the join index is (`join_index.prepare`: rank 0 of a run
    on a filesystem while the caller's barrier holds the others; the first rank of each node for an object-store
    run). Neighbours mined from another state of the cache are refused, and so is a cache above `max_rows`."""
    meta = read_meta(negatives)
    if meta.get("cache") != cache_state(cache):
        raise NegativesError(f"the neighbours at {negatives} were mined from another state of text cache {cache.dir} "
                             f"(its shards or model differ): run `l2c mine-negatives --text-cache {cache.dir}` "
                             "again into a new --out, or remove the old ones first")  # fmt: skip
    join_index.check_size(cache, max_rows, "loss.hard_negatives (looking up the neighbours' captions by key)")
    index_dir, _ = join_index.prepare(cache, run, main)
    if run.remote:
        with join_index.node_lock(index_dir.with_name(f".{index_dir.name}.lock")):
            _ensure_table(cache, Path(negatives), meta, index_dir)
    elif main:
        _ensure_table(cache, Path(negatives), meta, index_dir)
    return NegativeBank(cache.dir, fields, index_dir)


def _ensure_table(cache: TextCache, negatives: Path, meta: dict, index_dir: Path) -> None:
    stamp = {"negatives": str(negatives.resolve()), "mined": meta["cache"], "settings": meta["settings"]}
    done = index_dir / STAMP
    if (index_dir / TABLE).exists() and done.exists() and json.loads(done.read_text()) == stamp:
        return
    _write_table(cache, negatives, index_dir, index_dir / TABLE, int(meta["settings"]["k"]))
    atomic.write_json(done, stamp)


def _write_table(cache: TextCache, negatives: Path, index_dir: Path, table: Path, k: int) -> None:
    keys = np.load(index_dir / "keys.npy", mmap_mode="r")
    with atomic.atomic_path(table) as tmp:
        arr = np.lib.format.open_memmap(tmp, "w+", np.int32, (len(keys), k))
        arr[:] = -1
        for name in cache.shard_names:
            path = negatives / f"{name}.parquet"
            if not path.exists():
                raise NegativesError(f"{negatives} has no neighbours for cache shard {name}: run `l2c mine-negatives` "
                                     "again to finish it")  # fmt: skip
            t = pq.read_table(path, columns=["key", "neighbors"])
            rows = _positions(keys, t.column("key").to_pylist())
            lists = t.column("neighbors").combine_chunks()
            lens = lists.value_lengths().fill_null(0).to_numpy().astype(np.int64)
            nb = _positions(keys, lists.flatten().to_pylist())
            row = np.repeat(rows, lens)
            col = np.arange(len(nb)) - np.repeat(np.cumsum(lens) - lens, lens)
            keep = (row >= 0) & (nb >= 0) & (col < k)
            arr[row[keep], col[keep]] = nb[keep]
        arr.flush()
        del arr


def _positions(keys: np.ndarray, wanted: list[str]) -> np.ndarray:
    """Positions of `wanted` in the sorted byte keys, -1 for keys not there."""
    enc = np.array([w.encode() for w in wanted], dtype=bytes) if wanted else np.zeros(0, "S1")
    if not len(keys):
        return np.full(len(enc), -1, np.int64)
    i = np.minimum(np.searchsorted(keys, enc), len(keys) - 1)
    return np.where(keys[i] == enc, i, -1).astype(np.int64)
