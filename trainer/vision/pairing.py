"""Pairing image samples with cached text vectors, by key, never by position alone.

Each tar is paired one of two ways. *Aligned*: the tar has its own cache shard (rows in the tar's key order,
found as `TextCache.shard_for_source` finds it): the two are zipped and every key is checked; only that shard
is read. A shard whose order differs from its tar is detected (`aligned`: an error; `auto`: joined by key
within that shard, the keys out of place counted as `misordered`). *Join*: a tar without a shard of its own
is paired through the join index of the whole cache (`join_index.py`: built once, kept, and refused for
caches above `data.join_max_rows`, where `l2c align-cache` makes an aligned cache instead).

`data.pairing`: `aligned` pairs every tar by its shard (a tar without one is an error); `join` pairs every
tar through the index; `auto` pairs tars that have a shard by it and the others through the index, when the
cache is small enough for one, else refuses, naming them. `plan_tars` decides in O(tars + shards).

`pair_shard` yields, in tar order:
    ("ok", key, sample, {field: vector})    ("missing_vector", key)    ("missing_image", key)
    ("end", {"vector_without_image": n, "misordered": m})              once per shard
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2c.cache import CacheError, TextCache, embedding_matrix
from l2c.data.images import image_member
from l2c.fields import covers
from l2c.trainer.vision import join_index

MAX_NAMED = 5  # tars named in a message or report, of those without a cache shard


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
    """Picklable pairing of tars with a text cache: tars in `shard_names` by their own shard (aligned), the
    others through the join index in `index_dir`. A process opens the cache once and keeps the shard it read
    last; the join index is memory-mapped."""

    def __init__(
        self,
        cache_dir: str | Path,
        fields: list[str],
        shard_names: dict[str, str] | None = None,
        index_dir: str | Path | None = None,
        strict: bool = False,
        shuffle_seed: int | None = None,
        cache: TextCache | None = None,
    ):
        if shard_names is None and index_dir is None:
            raise ValueError("give shard_names (aligned), index_dir (join) or both")
        self.cache_dir = str(cache_dir)
        self.fields = list(fields)
        self.shard_names = dict(shard_names or {})
        self.index_dir = str(index_dir) if index_dir else None
        self.strict = strict
        self.shuffle_seed = shuffle_seed  # the shuffled-pairs control: each key gets another key's captions
        self._cache, self._cache_pid = cache, os.getpid()
        self._shard: tuple | None = None
        self._index: tuple | None = None
        self._perm: np.ndarray | None = None
        self.info: dict = {}  # what the plan decided, for the run's reports (PairingPlan.report)

    @property
    def mode(self) -> str:
        """aligned, join, or mixed (aligned for the tars with a shard, join for the others)."""
        if self.index_dir is None:
            return "aligned"
        return "mixed" if self.shard_names else "join"

    def tar_counts(self, tars: list[str]) -> dict[str, int]:
        aligned = sum(t in self.shard_names for t in tars)
        return {"aligned": aligned, "join": len(tars) - aligned}

    def __getstate__(self):
        return {**self.__dict__, "_cache": None, "_shard": None, "_index": None, "_perm": None}

    @property
    def cache(self) -> TextCache:
        """The cache, opened once per process (the manifest is read here only); a forked data worker opens its
        own (an object store's client does not survive a fork)."""
        if self._cache is None or self._cache_pid != os.getpid():
            self._cache, self._cache_pid = TextCache(self.cache_dir), os.getpid()
        return self._cache

    # -- aligned ----------------------------------------------------------------------------------
    def _shard_groups(self, name: str) -> tuple[list[str], dict[str, int], list[dict[str, np.ndarray]]]:
        if self._shard is not None and self._shard[0] == name:
            return self._shard[1]
        cache = self.cache
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
        self._shard = (name, (order, where, groups))
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
    def _join(self):
        if self._index is None:
            d = Path(self.index_dir)
            meta = json.loads((d / "index.json").read_text())
            meta["wanted"] = [any(covers(s, f) for s in self.fields) for f in meta["fields"]]  # once, not per key
            self._index = (
                meta,
                np.load(d / "keys.npy", mmap_mode="r"),
                np.load(d / "rows.npy", mmap_mode="r"),
                np.load(d / "vectors.npy", mmap_mode="r"),
            )
        return self._index

    def lookup(self, key: str) -> dict[str, np.ndarray]:
        meta, keys, rows, vecs = self._join()
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
        if self._perm is None:
            self._perm = derangement(len(self._join()[1]), self.shuffle_seed)
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
        if url in self.shard_names:
            return self._pair_aligned(url, samples)
        if self.index_dir is None:
            raise CacheError(f"{url} has no shard in text cache {self.cache_dir} and this run has no join index")
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




@dataclass
class PairingPlan:
    """How each tar is paired: by its own shard (`aligned`), or through the join index (`join_tars`)."""

    aligned: dict[str, str]  # tar -> its cache shard
    join_tars: list[str]  # tars paired through the join index, in --images order
    without_shard: list[str]  # tars with no cache shard of their own (all of them join tars)
    strict: bool
    join_estimate: dict | None = None  # rows, bytes, seconds of the join index, when one is needed

    @property
    def join(self) -> bool:
        return bool(self.join_tars)

    def describe(self) -> str:
        """One line: which pairing for how many tars, naming the first tars without a shard."""
        parts = [f"aligned for {len(self.aligned):,} tar(s)"] if self.aligned else []
        if self.join_tars:
            why = f", {len(self.without_shard):,} without a cache shard of their own (first: " \
                  f"{', '.join(self.without_shard[:MAX_NAMED])})" if self.without_shard else ""  # fmt: skip
            parts.append(f"join by key for {len(self.join_tars):,} tar(s){why}")
        return "pairing: " + "; ".join(parts)

    def report(self) -> dict:
        """What data_skips.json and summary.json record."""
        return {"aligned_tars": len(self.aligned), "join_tars": len(self.join_tars),
                "tars_without_cache_shard": len(self.without_shard),
                "first_tars_without_cache_shard": self.without_shard[:MAX_NAMED]}  # fmt: skip

    def pairing(self, cache: TextCache, fields: list[str], index_dir: str | Path | None,
                shuffle_seed: int | None = None) -> Pairing:  # fmt: skip
        if self.join and index_dir is None:
            raise ValueError("this plan pairs tars through a join index: give its directory")
        p = Pairing(cache.dir, fields, shard_names=self.aligned, index_dir=index_dir if self.join else None,
                    strict=self.strict, shuffle_seed=shuffle_seed, cache=cache)  # fmt: skip
        p.info = self.report()
        return p


def plan_tars(cache: TextCache, tars: list[str], mode: str, join_max_rows: int,
              images: str | list[str] | None = None) -> PairingPlan:  # fmt: skip
    """Decide each tar's pairing in O(tars + shards) (see the module docstring for `mode`); refuse with one line
    a tar without a shard under `aligned`, and a join index above `join_max_rows` rows. `images`: the tars as
    the user gave them, for the `l2c align-cache` command the refusal suggests."""
    find = cache.shard_for_source
    names = {t: find(t) for t in tars}
    without = [t for t, n in names.items() if n is None]
    lacking = f"{len(without):,} of {len(tars):,} tar(s) have no cache shard of their own (first: " \
              f"{', '.join(without[:MAX_NAMED])})"  # fmt: skip
    if mode == "aligned" and without:
        raise CacheError(f"data.pairing=aligned but {lacking}. Align the cache to the tars: "
                         f"`{join_index.align_command(cache, images)}` and train with --text-cache DIR, or use "
                         "data.pairing=auto")  # fmt: skip
    if mode == "join":
        aligned, join_tars, why = {}, list(tars), "data.pairing=join"
    else:
        aligned, join_tars = {t: n for t, n in names.items() if n is not None}, without
        why = f"{lacking}; pairing them by key"
    estimate = join_index.check_size(cache, join_max_rows, why, images) if join_tars else None
    return PairingPlan(aligned, join_tars, without, strict=mode == "aligned", join_estimate=estimate)


def plan_pairing(
    cache: TextCache,
    shards: list[str],
    mode: str,
    fields: list[str],
    index_dir: str | Path,
    shuffle_seed: int | None = None,
    join_max_rows: int | None = None,
) -> Pairing:
    """`plan_tars` and, when some tar needs it, the join index built (or reused) in `index_dir`: for one process."""
    from l2c.trainer.vision.config import DataConfig

    limit = DataConfig.join_max_rows if join_max_rows is None else join_max_rows
    plan = plan_tars(cache, shards, mode, limit)
    if plan.join:
        join_index.ensure(cache, index_dir)
    return plan.pairing(cache, fields, index_dir, shuffle_seed)
