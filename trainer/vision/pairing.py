"""Pairing image samples with cached text vectors, by key, never by position alone.

*Aligned* caches have one Parquet per tar with rows in the tar's key order: each tar is zipped with its
cache shard and every key is checked. A cache shard whose order differs from its tar is detected
(`aligned`: an error; `auto`: joined by key for that shard, and the keys out of place counted as
`misordered`). Otherwise a
*join* index (sorted keys -> rows, vectors as a memory-mapped .npy) is built once and looked up.

`pair_shard` yields, in tar order:
    ("ok", key, sample, {field: vector})    ("missing_vector", key)    ("missing_image", key)
    ("end", {"vector_without_image": n, "misordered": m})              once per shard
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from l2c import atomic
from l2c.cache import CacheError, TextCache, embedding_matrix
from l2c.data.images import image_member
from l2c.fields import covers

INDEX_VERSION = 2


def used_fields(cache: TextCache, weights: dict[str, float]) -> list[str]:
    """Cache fields to sample captions from: those with weight > 0 (all, when no weights are given)."""
    if not weights:
        return cache.fields
    unknown = sorted(w for w in weights if not any(covers(f, w) for f in cache.fields))
    if unknown:
        raise CacheError(
            f"data.caption_weights names field(s) {unknown} the cache lacks (it has {cache.fields})"
        )
    fields = [w for w, x in weights.items() if x > 0]
    if not fields:
        raise CacheError("data.caption_weights gives every field weight 0")
    return fields


class Pairing:
    """Picklable pairing plan; workers load cache shards / the join index lazily."""

    def __init__(
        self,
        cache_dir: str | Path,
        fields: list[str],
        shard_names: dict[str, str] | None = None,
        index_dir: str | Path | None = None,
        strict: bool = False,
        shuffle_seed: int | None = None,
    ):
        if (shard_names is None) == (index_dir is None):
            raise ValueError("give shard_names (aligned) or index_dir (join)")
        self.cache_dir = str(cache_dir)
        self.fields = list(fields)
        self.shard_names = shard_names
        self.index_dir = str(index_dir) if index_dir else None
        self.strict = strict
        self.shuffle_seed = shuffle_seed  # the shuffled-pairs control: each key gets another key's captions
        self._loaded: tuple | None = None

    @property
    def mode(self) -> str:
        return "aligned" if self.shard_names is not None else "join"

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None, "_perm": None}

    # -- aligned ----------------------------------------------------------------------------------
    def _shard_groups(self, name: str) -> tuple[list[str], dict[str, int], list[dict[str, np.ndarray]]]:
        if self._loaded is not None and self._loaded[0] == name:
            return self._loaded[1]
        cache = TextCache(self.cache_dir)
        table = cache.read_shard(name, ["key", "field", "embedding"])
        keys, flds, vecs = (
            table.column("key").to_pylist(),
            table.column("field").to_pylist(),
            embedding_matrix(table),
        )
        check_finite(vecs, keys, flds, f"text cache {cache.dir} shard {name}")
        order: list[str] = []
        where: dict[str, int] = {}
        groups: list[dict[str, np.ndarray]] = []
        wanted = cache.field_mask(flds, self.fields)
        for i, (k, f) in enumerate(zip(keys, flds, strict=True)):
            if k not in where:
                where[k] = len(order)
                order.append(k)
                groups.append({})
            if wanted[i]:
                groups[where[k]][f] = vecs[i]
        if self.shuffle_seed is not None:
            groups = [groups[j] for j in derangement(len(groups), self.shuffle_seed, name)]
        self._loaded = (name, (order, where, groups))
        return order, where, groups

    def _pair_aligned(self, url: str, samples: Iterator[dict]) -> Iterator[tuple]:
        name = self.shard_names[url]
        order, where, groups = self._shard_groups(name)
        j, matched, misordered, seq = 0, set(), 0, []
        for sample in samples:
            key = sample["__key__"]
            if j < len(order) and order[j] == key:
                gi = j
                j += 1
            elif key in where:
                gi = where[key]
                if misordered == 0 and self.strict:
                    raise CacheError(
                        f"cache shard {name!r} is not in the key order of {url}: tar key {key!r} is cache row "
                        f"group {gi}, expected {order[j] if j < len(order) else 'end of shard'!r}. The cache "
                        "was not built from this tar; rebuild it or use data.pairing=join"
                    )
                misordered += 1
            else:
                yield ("missing_vector", key)
                continue
            matched.add(gi)
            seq.append(gi)
            yield self._item(key, sample, groups[gi])
        if misordered:  # keys out of place: those outside the longest run already in cache order
            misordered = len(seq) - longest_increasing(seq)
        yield ("end", {"vector_without_image": len(order) - len(matched), "misordered": misordered})

    # -- join -------------------------------------------------------------------------------------
    def _index(self):
        if self._loaded is None:
            d = Path(self.index_dir)
            meta = json.loads((d / "index.json").read_text())
            meta["wanted"] = [any(covers(s, f) for s in self.fields) for f in meta["fields"]]  # once, not per key
            self._loaded = (
                meta,
                np.load(d / "keys.npy", mmap_mode="r"),
                np.load(d / "rows.npy", mmap_mode="r"),
                np.load(d / "vectors.npy", mmap_mode="r"),
            )
        return self._loaded

    def lookup(self, key: str) -> dict[str, np.ndarray]:
        meta, keys, rows, vecs = self._index()
        k = key.encode()
        i = int(np.searchsorted(keys, k))
        if i >= len(keys) or keys[i] != k:
            return {}
        if self.shuffle_seed is not None:
            i = int(self._derangement()[i])
        return {
            f: np.asarray(vecs[r], dtype=np.float32)
            for f, r, want in zip(meta["fields"], rows[i], meta["wanted"], strict=True)
            if r >= 0 and want
        }

    def _derangement(self) -> np.ndarray:
        if getattr(self, "_perm", None) is None:
            self._perm = derangement(len(self._index()[1]), self.shuffle_seed)
        return self._perm

    def _pair_join(self, url: str, samples: Iterator[dict]) -> Iterator[tuple]:
        for sample in samples:
            key = sample["__key__"]
            choices = self.lookup(key)
            yield self._item(key, sample, choices) if choices else ("missing_vector", key)
        yield ("end", {})

    # -- both -------------------------------------------------------------------------------------
    @staticmethod
    def _item(key: str, sample: dict, choices: dict) -> tuple:
        if not choices:
            return ("missing_vector", key)
        if image_member(sample) is None and "__features__" not in sample:  # an image cache's sample: see ImageCache
            return ("missing_image", key)
        return ("ok", key, sample, choices)

    def pair_shard(self, url: str, samples: Iterator[dict]) -> Iterator[tuple]:
        if self.shard_names is not None:
            return self._pair_aligned(url, samples)
        return self._pair_join(url, samples)


def check_finite(vecs: np.ndarray, keys: list[str], fields: list[str], where: str) -> None:
    """Refuse vectors holding NaN or inf (a damaged shard) before any of them reaches a training step."""
    bad = np.flatnonzero(~np.isfinite(vecs).all(axis=1))
    if len(bad):
        i = int(bad[0])
        raise CacheError(
            f"{where}: {len(bad)} vector(s) are not finite (first: key {keys[i]!r}, field {fields[i]!r}); the shard is "
            "damaged: re-embed it into a new cache (`l2c cache-info` lists its problems)"
        )


def derangement(n: int, seed: int, salt: str = "") -> np.ndarray:
    """A fixed permutation with no fixed point (n > 1): position i takes the item at [i]."""
    rng = np.random.default_rng([seed, *salt.encode()])
    order = rng.permutation(n)
    out = np.arange(n)
    out[order] = np.roll(order, -1)
    return out


def longest_increasing(seq: list[int]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting)."""
    import bisect

    tails: list[int] = []
    for x in seq:
        i = bisect.bisect_left(tails, x)
        tails[i : i + 1] = [x]
    return len(tails)


def build_join_index(cache: TextCache, out_dir: str | Path) -> Path:
    """Sorted keys, per-key row of each field, and the vectors as .npy files; reused while the cache is same."""
    out_dir = Path(out_dir)
    stamp = {
        "version": INDEX_VERSION,
        "fingerprint": cache.fingerprint,
        "shards": {n: e.sha256 for n, e in sorted(cache.manifest.shards.items())},
    }
    meta_path = out_dir / "index.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in stamp} == stamp:
            return out_dir
    keys, flds, vecs = cache.load(dtype=np.float16)
    check_finite(vecs, keys, flds, f"text cache {cache.dir}")
    fields = list(dict.fromkeys(flds))  # row field names: `json:captions[*]` is stored as captions[0], [1], ...
    fpos = {f: i for i, f in enumerate(fields)}
    ukeys = sorted(set(keys))
    kpos = {k: i for i, k in enumerate(ukeys)}
    rows = np.full((len(ukeys), len(fields)), -1, dtype=np.int64)
    for r, (k, f) in enumerate(zip(keys, flds, strict=True)):
        if f in fpos:
            rows[kpos[k], fpos[f]] = r
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = np.array([k.encode() for k in ukeys], dtype=bytes) if ukeys else np.zeros(0, "S1")
    for name, arr in (("keys", enc), ("rows", rows), ("vectors", vecs)):
        with atomic.atomic_path(out_dir / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    atomic.write_json(meta_path, {**stamp, "fields": fields, "n_keys": len(ukeys), "n_rows": len(keys)})
    return out_dir


def plan_pairing(
    cache: TextCache,
    shards: list[str],
    mode: str,
    fields: list[str],
    index_dir: str | Path,
    shuffle_seed: int | None = None,
) -> Pairing:
    """Aligned when every tar has its own cache shard (mode auto/aligned), else a join index."""
    names = {url: cache.shard_for_source(url) for url in shards}
    missing = [u for u, n in names.items() if n is None]
    if mode == "aligned" and missing:
        raise CacheError(
            f"data.pairing=aligned but {len(missing)} tar(s) have no cache shard (first: {missing[0]}); "
            "embed them, or use data.pairing=join"
        )
    if mode in ("auto", "aligned") and not missing:
        return Pairing(cache.dir, fields, shard_names=names, strict=mode == "aligned", shuffle_seed=shuffle_seed)
    return Pairing(cache.dir, fields, index_dir=build_join_index(cache, index_dir), shuffle_seed=shuffle_seed)
