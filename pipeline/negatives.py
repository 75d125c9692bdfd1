"""`l2c mine-negatives`: each key's nearest other keys in a text cache, mined once with faiss, one small Parquet
per cache shard beside it.

A key's vector is the mean of its captions' vectors (the fields asked for, all by default), each L2-normalised
first, then normalised again; its neighbours are the `k` keys whose vectors lie nearest, itself left out.
`OUT/<shard>.parquet` (OUT: `TEXT_CACHE/negatives` by default) holds `key`, `neighbors` (list of keys, nearest
first) and `scores` (their cosine similarities; approximate with `ivfpq`) for the keys of cache shard <shard>,
in the shard's key order, so the shard stays the unit; `OUT/negatives.json` records the settings and the cache
state (every shard's sha256) they were mined from, which `train-vision` checks (`loss.hard_negatives`).

Three passes over the cache, shard by shard: the keys (the key column only), the index (built from every key
vector) and the search (each shard's keys against the index, written as its Parquet). The index:

- `flat` (what `auto` picks when the key vectors fit in `FLAT_MAX_BYTES`, 1 GiB: 6,000 Flickr8k keys of 384
  dims are 9 MB): exact inner product, the neighbours a brute-force search finds;
- `ivfpq` (what `auto` picks above that): PCA to `pca_dim` dims (trained on `PCA_TRAIN` sampled key vectors),
  an inverted file of `nlist` lists with an HNSW coarse quantizer and `pq`-byte product codes, trained on
  `train_size` key vectors from randomly chosen shards, searched `nprobe` lists deep; on normalised vectors
  its L2 order is the cosine order;
- any other faiss `index_factory` string (L2 on the normalised key vectors), trained on the sample as given.

At the users' scale, 75M caption vectors of 4096 dims in 15,000 shards (two fields: 37.5M keys of ~2,500 per
shard), `ivfpq` with the defaults (PCA 256, 16,384 lists, PQ32, nprobe 16) holds at its peak: the keys as Arrow
strings (~1.5 GB), the codes and ids (40 B a key: 1.5 GB), the PCA's training sample (65,536 x 4096 x 4 B =
1.1 GB, freed before the IVF sample of 262,144 x 256 x 4 B = 0.27 GB) and one shard's vectors (5,000 x 4096 x 4 B
= 82 MB): about 4.5 GB, whatever the cache's size beyond the keys and codes. Its time is two reads of the
cache (614 GB of float16 each: the add and the search pass) and the search: each query scans nprobe/nlist of the
codes, ~36,600 codes of 32 B, 1.3 ms on one core (benchmarks/bench_mine.py: 3.1e-8 s a code and 39 us fixed at
1024 dims, CPU time on this project's machine), so 37.5M queries are ~14 core-hours, under an hour on 16 cores,
beside the reads. The benchmark's run (50,000 keys of 1024 dims, 8 shards) peaked at 0.9 GB resident. The
index is kept (`index.faiss`), so a rerun after a stop searches only the shards it lacks.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from l2c import atomic
from l2c.cache import CacheError, TextCache, embedding_matrix, write_shard_file
from l2c.errors import L2CError

FORMAT = "l2c-negatives"
VERSION = 1
META = "negatives.json"
INDEX_FILE = "index.faiss"
FLAT_MAX_BYTES = 1 << 30
PCA_TRAIN = 65_536
log = logging.getLogger(__name__)


class NegativesError(L2CError):
    """Mined negatives that are missing, or were mined from another state of the cache."""


@dataclass
class MineConfig:
    text_cache: str = ""
    out: str = ""  # default: TEXT_CACHE/negatives
    k: int = 16
    fields: list[str] = field(default_factory=list)  # default: every field of the cache
    index: str = "auto"  # auto | flat | ivfpq | a faiss index_factory string
    nprobe: int = 16
    nlist: int = 0  # ivfpq: 0 picks a power of two near 4 sqrt(keys), at most train_size / 16
    pca_dim: int = 256
    pq: int = 32
    train_size: int = 262_144
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not self.text_cache:
            raise NegativesError("mine-negatives needs --text-cache (or text_cache in the --config file)")
        if self.k < 1 or self.nprobe < 1 or self.train_size < 1 or self.pq < 1 or self.pca_dim < 1 or self.nlist < 0:
            raise NegativesError("mine-negatives: k, nprobe, train_size, pq and pca_dim must be >= 1, nlist >= 0")

    def settings(self) -> dict:
        """What makes the output what it is (a rerun with other settings starts afresh)."""
        d = asdict(self)
        for k in ("text_cache", "out", "progress"):
            d.pop(k)
        return d


def out_dir(cfg: MineConfig) -> Path:
    """The local folder the neighbours go to (a cache in an object store needs `--out`)."""
    where = cfg.out or f"{TextCache(cfg.text_cache).dir}/negatives"
    if "://" in where and not where.startswith("file://"):
        raise NegativesError(f"mine-negatives writes a local folder, not {where}: pass --out DIR (and "
                             "loss.negatives=DIR to train-vision)")  # fmt: skip
    return Path(where.removeprefix("file://"))


def cache_state(cache: TextCache) -> dict:
    """The cache as the neighbours were mined from it: the model and every shard's sha256."""
    return {"fingerprint": cache.fingerprint, "shards": {n: e.sha256 for n, e in sorted(cache.manifest.shards.items())}}


def key_vectors(table: pa.Table, mask: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """(keys in first-seen order, [n_keys, dim] float32): each key's caption vectors (rows in `mask`), each
    normalised, averaged and normalised again."""
    import torch

    table = table.filter(pa.array(mask))
    keys = table.column("key").combine_chunks()
    uniq = pc.unique(keys)
    inv = torch.from_numpy(pc.index_in(keys, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64))
    vecs = torch.nn.functional.normalize(torch.from_numpy(embedding_matrix(table, np.float32)), dim=1)
    out = torch.zeros(len(uniq), vecs.shape[1]).index_add_(0, inv, vecs)
    return uniq, torch.nn.functional.normalize(out, dim=1).numpy()


class _Shards:
    """The cache's shards, read one at a time, with each shard's keys (pass 1) and their global ids."""

    def __init__(self, cache: TextCache, fields: list[str]):
        self.cache, self.fields = cache, fields or cache.fields
        self.names = cache.shard_names
        self.keys: list[pa.Array] = []
        for name in self.names:
            t = cache.read_shard(name, ["key", "field"])
            mask = cache.field_mask(t.column("field").to_pylist(), self.fields)
            self.keys.append(pc.unique(t.column("key").combine_chunks().filter(pa.array(mask))))
        self.offsets = np.cumsum([0] + [len(k) for k in self.keys])
        self.all_keys = pa.chunked_array(self.keys, pa.string())
        self.n = int(self.offsets[-1])

    def vectors(self, i: int) -> np.ndarray:
        t = self.cache.read_shard(self.names[i], ["key", "field", "embedding"])
        keys, x = key_vectors(t, self.cache.field_mask(t.column("field").to_pylist(), self.fields))
        if not keys.equals(self.keys[i]):
            raise CacheError(f"text cache {self.cache.dir}: shard {self.names[i]} changed while being mined")
        if not np.isfinite(x).all():
            raise CacheError(f"text cache {self.cache.dir} shard {self.names[i]}: vectors that are not finite; "
                             "`l2c cache-info` lists the damage")  # fmt: skip
        return x


def pick_index(cfg: MineConfig, n: int, dim: int) -> str:
    if cfg.index != "auto":
        return cfg.index
    return "flat" if n * dim * 4 <= FLAT_MAX_BYTES else "ivfpq"


def _nlist(cfg: MineConfig, n: int) -> int:
    if cfg.nlist:
        return cfg.nlist
    want = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(n))))
    return int(max(16, min(want, 2 ** int(math.log2(max(16, min(cfg.train_size, n) // 16))))))


def _sample(shards: _Shards, size: int, seed: int, transform=None) -> np.ndarray:
    """Up to `size` key vectors from shards taken in a seeded random order (each shard's keys subsampled at the
    cache-wide rate), transformed as they come (`transform`: the PCA) so only the sample is held."""
    rate = min(1.0, size / max(1, shards.n))
    order = list(range(len(shards.names)))
    rng = random.Random(seed)
    rng.shuffle(order)
    got, held = [], 0
    np_rng = np.random.default_rng(seed)
    for i in order:
        if held >= size:
            break
        x = shards.vectors(i)
        x = x[np_rng.random(len(x)) < rate] if rate < 1 else x
        x = x[: size - held]
        got.append(transform(x) if transform is not None else x)
        held += len(x)
    return np.concatenate(got) if got else np.zeros((0, 0), np.float32)


def build_index(cfg: MineConfig, shards: _Shards, dim: int, kind: str):
    """The trained, filled faiss index of every key vector (ids: the keys' global numbers)."""
    import faiss

    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    elif kind == "ivfpq":
        d = min(cfg.pca_dim, dim)
        pca = faiss.PCAMatrix(dim, d)
        pca.train(_sample(shards, min(PCA_TRAIN, cfg.train_size), cfg.seed))
        nlist = _nlist(cfg, shards.n)
        pq = cfg.pq if d % cfg.pq == 0 else next(m for m in range(min(cfg.pq, d), 0, -1) if d % m == 0)
        sample = _sample(shards, cfg.train_size, cfg.seed + 1, pca.apply_py)
        bits = max(1, min(8, int(math.log2(max(2, len(sample))))))  # 256 codes a sub-vector, fewer for a tiny cache
        inner = faiss.index_factory(d, f"IVF{nlist}_HNSW32,PQ{pq}x{bits}", faiss.METRIC_L2)
        inner.train(sample)
        index = faiss.IndexPreTransform(pca, inner)
    else:
        try:
            index = faiss.index_factory(dim, kind, faiss.METRIC_L2)
        except RuntimeError as e:
            raise NegativesError(f"--index {kind!r} is not a faiss index_factory string: {e}") from None
        if not index.is_trained:
            index.train(_sample(shards, cfg.train_size, cfg.seed + 1))
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap(index)
    for i in range(len(shards.names)):
        ids = np.arange(shards.offsets[i], shards.offsets[i + 1], dtype=np.int64)
        index.add_with_ids(shards.vectors(i), ids)
    _set_nprobe(index, cfg.nprobe)
    return index


def _set_nprobe(index, nprobe: int) -> None:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def search_shard(index, x: np.ndarray, ids: np.ndarray, k: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """([n, k] neighbour ids, -1 where fewer exist; [n, k] cosine scores), each key's own id left out."""
    d, got = index.search(x, k + 1)
    scores = d if kind == "flat" else 1.0 - d / 2  # L2 between unit vectors -> cosine
    nb = np.full((len(x), k), -1, np.int64)
    sc = np.full((len(x), k), np.nan, np.float32)
    for r in range(len(x)):
        keep = (got[r] >= 0) & (got[r] != ids[r])
        row, s = got[r][keep][:k], scores[r][keep][:k]
        nb[r, : len(row)], sc[r, : len(row)] = row, s
    return nb, sc


def _table(keys: pa.Array, nb: np.ndarray, sc: np.ndarray, all_keys: pa.ChunkedArray) -> pa.Table:
    have = nb >= 0
    flat = all_keys.take(pa.array(nb[have])).combine_chunks() if have.any() else pa.array([], pa.string())
    offsets = pa.array(np.concatenate([[0], np.cumsum(have.sum(1))]).astype(np.int32))
    return pa.table({
        "key": keys,
        "neighbors": pa.ListArray.from_arrays(offsets, flat),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(sc[have], pa.float32())),
    })  # fmt: skip


def run_mine(cfg: MineConfig) -> dict:
    """Mine every shard's neighbours into `out_dir(cfg)` (a rerun with the same settings and cache writes only
    the shards it lacks); returns a summary."""
    import faiss

    from l2c.outputs import check, mark
    from l2c.progress import track

    cfg.validate()
    t0 = time.perf_counter()
    cache = TextCache(cfg.text_cache)
    out = out_dir(cfg)
    inside = out.resolve().parent == Path(cache.dir).resolve() and out.name == "negatives"
    if not inside:  # TEXT_CACHE/negatives is the cache's own; anywhere else the --out rule holds
        check(out, "mine-negatives", owns=("*.parquet", META, INDEX_FILE))
    want = {"format": FORMAT, "version": VERSION, "settings": cfg.settings(), "cache": cache_state(cache)}
    meta_path = out / META
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old is not None and {k: old.get(k) for k in want} != want:
        raise NegativesError(f"{out} holds neighbours mined with other settings or from another state of the cache; "
                             "remove it, or choose another --out")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if not inside:
        mark(out, "mine-negatives")
    shards = _Shards(cache, list(cfg.fields))
    if shards.n < 2:
        raise NegativesError(f"text cache {cache.dir} has {shards.n} key(s) with the fields {shards.fields}: nothing "
                             "to mine")  # fmt: skip
    kind = pick_index(cfg, shards.n, cache.dim)
    atomic.write_json(meta_path, {**want, "index": kind, "keys": shards.n, "finished": False})
    todo = [i for i, n in enumerate(shards.names) if not (out / f"{n}.parquet").exists()]
    build_s = None
    if todo:
        if (out / INDEX_FILE).exists():
            index = faiss.read_index(str(out / INDEX_FILE))
            _set_nprobe(index, cfg.nprobe)
        else:
            t_build = time.perf_counter()
            index = build_index(cfg, shards, cache.dim, kind)
            build_s = round(time.perf_counter() - t_build, 2)
            with atomic.atomic_path(out / INDEX_FILE) as tmp:
                faiss.write_index(index, str(tmp))
    t_search = time.perf_counter()
    with track("mine-negatives (search)", len(todo), "shards", enabled=cfg.progress) as advance:
        for i in todo:
            ids = np.arange(shards.offsets[i], shards.offsets[i + 1], dtype=np.int64)
            nb, sc = search_shard(index, shards.vectors(i), ids, cfg.k, kind)
            write_shard_file(out, f"{shards.names[i]}.parquet", _table(shards.keys[i], nb, sc, shards.all_keys))
            advance(1)
    search_s = time.perf_counter() - t_search
    summary = {**want, "index": kind, "keys": shards.n, "shards": len(shards.names), "shards_written": len(todo),
               "seconds": round(time.perf_counter() - t0, 2), "search_s_per_key": search_s / max(1, sum(
                   int(shards.offsets[i + 1] - shards.offsets[i]) for i in todo)) if todo else None,
               "build_s": build_s, "finished": True, "out": str(out)}  # fmt: skip
    atomic.write_json(meta_path, summary)
    return summary


def read_meta(directory: str | Path) -> dict:
    """`negatives.json` of mined neighbours; a `NegativesError` naming the command when absent or unfinished."""
    p = Path(directory) / META
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise NegativesError(f"no mined neighbours at {directory} ({META} missing): run `l2c mine-negatives "
                             "--text-cache TEXT_CACHE` first") from None  # fmt: skip
    if meta.get("format") != FORMAT or not meta.get("finished"):
        raise NegativesError(f"{p} is not a finished `l2c mine-negatives` output: run the command again")
    return meta
