"""What no single shard of an embed job can see: a key in two sources, and a job that yields nothing.

**Keys across sources.** Each write task returns 8-byte hashes (blake2b, about 1 us a key) of its shard's
keys; the driver keeps them per shard (the embed job's `Tally`: 8 bytes a key, 120 MB at 15M keys, plus about
100 bytes a shard). When the shards are done, `drop_cross_duplicates` sorts all hashes once, a stable sort in
source order (`_duplicates`: at most about 25 bytes a key while it runs, ~375 MB and 17 s for 15,000 shards of
1,000 keys on a 2-core machine), confirms each candidate with the keys themselves (so a hash collision never
drops a caption), and keeps every key where it first occurs in source order: its rows in later sources are
removed from their shard (rewritten atomically) and rejected as `duplicate_key`, naming the source of the
first. The result does not depend on the order shards finished in. Shards of an earlier run give their hashes
from the Parquet key column; `keys_checked.json` records the shards a finished check covered, so a rerun with
nothing new to embed checks nothing again.

**Nothing embedded.** A cache that ends with no vector at all (no record has the `--text-field`, or the
input is empty) is an error naming the fields and the fields the records do hold (`nothing_embedded`); the
manifest it wrote is removed (`clear_empty`), so the rerun with the right field starts clean.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from dataclasses import replace
from functools import lru_cache

import numpy as np

STAMP = "keys_checked.json"
REASON = "duplicate_key"


def key_hashes(keys) -> np.ndarray:
    """uint64 hashes of the distinct `keys`, in first-seen order."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest(), "little")
         for k in dict.fromkeys(keys)), np.uint64)  # fmt: skip


def pack(hashes: np.ndarray) -> str:
    """Hashes as text for a JSON result row (base64 of the little-endian bytes)."""
    return base64.b64encode(hashes.astype("<u8").tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<u8").astype(np.uint64)


def _read_keys(out, entry) -> list[str]:
    import pyarrow.parquet as pq

    with out.open(entry.file) as f:
        return pq.read_table(f, columns=["key"]).column("key").to_pylist()


def _stamp(manifest, names: list[str]) -> str:
    done = [f"{n}:{manifest.shards[n].sha256}" for n in names if n in manifest.shards]
    return hashlib.sha256("\n".join(done).encode()).hexdigest()


def drop_cross_duplicates(out, manifest, names: list[str], hashes: dict[str, np.ndarray], strict: bool,
                          wrote: bool) -> Counter:  # fmt: skip
    """Remove the rows of every key already present in an earlier source (`names`: the shards in source order;
    `hashes`: those this run wrote, emptied here); returns {"duplicate_key": keys rejected}. `wrote`: this run
    wrote shards (otherwise a matching stamp skips the check). With `strict` a duplicate is a `CacheError`."""
    from l2c.cache import CacheError

    stamp = _stamp(manifest, names)
    if not wrote and out.exists(STAMP) and json.loads(out.read_text(STAMP)).get("shards") == stamp:
        hashes.clear()
        return Counter()
    order = [n for n in names if n in manifest.shards]
    arrays = [hashes.pop(n) if n in hashes else key_hashes(_read_keys(out, manifest.shards[n])) for n in order]
    hashes.clear()
    dups = _duplicates(arrays)
    del arrays

    @lru_cache(maxsize=8)
    def keys(i: int) -> tuple[list[str], frozenset]:  # a shard's distinct keys, in the order hashed
        distinct = list(dict.fromkeys(_read_keys(out, manifest.shards[order[i]])))
        return distinct, frozenset(distinct)

    found: Counter = Counter()
    for later in sorted(dups):
        mine = keys(later)[0]
        owner = {mine[pos]: first for pos, first in dups[later].items() if mine[pos] in keys(first)[1]}
        if not owner:  # hash collisions only
            continue
        if strict:
            key, first = next(iter(owner.items()))
            raise CacheError(f"--strict: key {key!r} of {manifest.shards[order[later]].source} is already in "
                             f"{manifest.shards[order[first]].source} ({len(owner)} such key(s) in this source)")
        found[REASON] += _drop(out, manifest, order[later], {k: order[f] for k, f in owner.items()})
    out.write_text(STAMP, json.dumps({"shards": _stamp(manifest, names)}) + "\n")
    return found


def _duplicates(arrays: list[np.ndarray]) -> dict[int, dict[int, int]]:
    """{shard index: {position of a key within that shard: index of the first shard holding its hash}} for
    every hash already held by an earlier shard (arrays in source order, distinct within each; the list is
    emptied, so its 8 bytes a key are freed as the sort begins)."""
    if not arrays:
        return {}
    sizes = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
    flat = np.concatenate(arrays)
    arrays.clear()
    order = np.argsort(flat, kind="stable")  # equal hashes keep source order: the first is the owner
    flat.sort()  # in place: the same values as flat[order], without a third copy
    dup = np.flatnonzero(flat[1:] == flat[:-1]) + 1  # sorted positions repeating the one before
    del flat
    if not len(dup):
        return {}
    run_start = np.concatenate([[True], dup[1:] != dup[:-1] + 1])  # a run of repeats of one hash...
    first = dup[np.maximum.accumulate(np.where(run_start, np.arange(len(dup)), 0))] - 1  # ...follows its first
    elems, owners = order[dup], order[first]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    shards = np.searchsorted(offsets, elems, side="right") - 1
    first_shards = np.searchsorted(offsets, owners, side="right") - 1
    out: dict[int, dict[int, int]] = {}
    for elem, shard, first_shard in zip(elems.tolist(), shards.tolist(), first_shards.tolist(), strict=True):
        out.setdefault(shard, {})[elem - int(offsets[shard])] = first_shard
    return out


def _drop(out, manifest, name: str, owner: dict[str, str]) -> int:
    """Rewrite shard `name` without the rows of `owner`'s keys, reject each key naming the source of its first
    occurrence, record the new entry; returns the number of keys."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from l2c.cache import REJECTED_DIR, write_shard_file

    entry = manifest.shards[name]
    with out.open(entry.file) as f:
        table = pq.read_table(f)
    drop = pc.is_in(table.column("key"), value_set=pa.array(sorted(owner), pa.string()))
    gone = table.filter(drop)
    rows, digest = write_shard_file(out, entry.file, table.filter(pc.invert(drop)))
    rejects = [{"shard": name, "source": entry.source, "key": k, "field": None, "reason": REASON,
                "detail": f"key first in {manifest.shards[first].source}"} for k, first in owner.items()]  # fmt: skip
    rel = f"{REJECTED_DIR}/{name}.jsonl"
    before = out.read_text(rel) if out.exists(rel) else ""
    out.write_text(rel, before + "".join(json.dumps(r) + "\n" for r in rejects))
    manifest.record(out, name, replace(entry, rows=rows, sha256=digest, n_rejected=entry.n_rejected + len(owner),
                                       n_truncated=entry.n_truncated - int(pc.sum(gone.column("truncated")).as_py() or 0),
                                       n_tokens=entry.n_tokens - int(pc.sum(gone.column("n_tokens")).as_py() or 0)))  # fmt: skip
    return len(owner)


# ------------------------------------------------------------------------------------- nothing embedded


def clear_empty(out, manifest, names: list[str]) -> None:
    """Remove the manifest and empty shards an embed job wrote into a cache that holds no vector, so a rerun
    with other settings (the right `--text-field`) is not refused as another cache; its rejects stay to read."""
    from l2c.cache import JOURNAL_DIR, MANIFEST

    for name in names:
        if name in manifest.shards and manifest.shards[name].rows == 0:
            out.remove(manifest.shards[name].file)
    for name in out.list(JOURNAL_DIR, ".json"):
        out.remove(f"{JOURNAL_DIR}/{name}")
    for name in (STAMP, MANIFEST):
        out.remove(name)


def _head(spec: str) -> str:
    """The record field a field spec starts at: `txt`, `json:long_caption`, `captions` of `captions[*]`."""
    member, _, rest = spec.partition(":") if ":" in spec else ("", "", spec)
    head = re.split(r"[.\[]", rest, maxsplit=1)[0]
    return f"{member}:{head}" if member else head


def fields_seen(sources: list[str], key_field: str, limit: int = 200) -> tuple[int, list[str]]:
    """(records read, sorted field names) over the first `limit` records of the sources: tar members and the
    keys of their JSON members (`json:long_caption`), table columns."""
    from l2c.data.records import BadRecord, iter_records
    from l2c.data.shards import TAR_SUFFIXES, read_tar

    n, seen = 0, set()
    for source in sources:
        try:
            records = read_tar(source, []) if source.endswith(TAR_SUFFIXES) else (r for _, r in iter_records(source))
            for rec in records:
                if isinstance(rec, BadRecord):
                    continue
                n += 1
                for k, v in rec.items():
                    if k.startswith("__") or k == key_field:
                        continue
                    seen.add(k)
                    if isinstance(v, (bytes, str)) and k in ("json",):
                        try:
                            doc = json.loads(v)
                        except ValueError:
                            continue
                        seen.update(f"{k}:{sub}" for sub in doc if isinstance(doc, dict))
                if n >= limit:
                    return n, sorted(seen)
        except Exception:  # an unreadable source is reported by the job itself
            continue
    return n, sorted(seen)


def nothing_embedded(out: str, sources: list[str], fields: list[str], key_field: str, reasons: dict) -> str:
    """The one line for a job that wrote no vector: what was asked, and what the records hold."""
    n, seen = fields_seen(sources, key_field)
    where = f"the {len(sources)} sources" if len(sources) > 1 else sources[0]
    if n == 0:
        return f"embed-captions wrote no vectors to {out}: {where} hold{'' if len(sources) > 1 else 's'} no records"
    why = ", ".join(f"{k}: {v}" for k, v in Counter(reasons).most_common(3))
    absent = [f for f in fields if _head(f) not in seen]
    if not absent:
        return (f"embed-captions wrote no vectors to {out}: every caption of {where} was rejected ({why}); "
                f"see {out}/rejected.jsonl")  # fmt: skip
    asked = ", ".join(f"--text-field {f}" for f in absent)
    return (f"embed-captions wrote no vectors to {out}: no record of {where} has {asked} (fields seen in the "
            f"records: {', '.join(seen) or 'none'}){'; rejected: ' + why if why else ''}")  # fmt: skip

