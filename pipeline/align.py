"""`l2c align-cache`: a text cache whose rows are grouped otherwise, rewritten as one shard per image tar.

Captions usually live apart from the images (JSONL/Parquet tables of dense captions for existing tars), so
their cache's shards follow the tables. `align-cache --text-cache C --images TARS --out DIR` writes an ordinary
text cache (`l2c.cache`; C's teacher and fields, plus a record of the tars it aligns) with one shard per tar,
named as `embed-captions` names a tar's shard and recording the tar as its source, rows in the tar's key order
(a key's rows in C's order), so `train-vision` and `eval-retrieval` read it as an aligned cache. Tar keys with
no vector in C are counted rejects (`rejected/<shard>.jsonl`, `rejected.jsonl`, the summary).

The join is a shuffle with memory bounded by a partition, not by the cache, in three stages on the runner of
the embed jobs (`pipeline/runner.py`: this process, or a Ray Data job with `--ray-address`):

1. **keys**, one task per tar: its keys in order (`l2c.data.shards.read_tar`, the reader train-vision uses),
   written to the work folder; the driver keeps 8-byte hashes (`crosscheck.key_hashes`) and builds one sorted
   index hash -> (tar, position) of 16 bytes a key (240 MB at 15M keys; memory-mapped by the tasks). Tars are
   cut into P partitions of consecutive tars, P = C's bytes / `--partition-mb`.
2. **route**, one task per batch of C's shards (about `--partition-mb` of vectors): each row group's rows are
   looked up by hash and written, per partition they fall in, to one file per (task, partition).
3. **write**, one task per partition: its files read (about `--partition-mb`), sorted by (tar, position, C's
   row order), keys checked as strings (a hash collision never pairs wrong keys), a (key, field) twice kept
   once (the last in C's order, as join pairing does), and each tar's shard written atomically
   (`write_shard_file`); the driver records it in the manifest journal.

Work files live in `DIR/.tmp-align/` and are removed at the end (and by the next run's start). A rerun
aligns only the tars without a complete shard (kill -9 loses the shards in flight); the stages reread C.
An `--out` holding a cache of another teacher or fields is refused naming the keys (`open_manifest`).

Measured (`benchmarks/bench_scale.py`, 2-core CPU, one process; docs/scale.md): peak RSS stays near the
partition (+ the key index), flat from 150k to 1.5M vectors; time is linear in the bytes of C. At 75M vectors
of 4,096-d float16 (614 GB) and 15,000 tars with the default 1,024 MB partitions: P = 600 partitions, about
600 x 600 work files, each task's RSS about 2.3 GB (one partition held twice while sorting, plus the
240 MB key index), and about 3 passes over the vector bytes (read C, write and read the work files, write the
shards): about 1.9 TB of I/O, a few hours on one 16-core node, minutes on a cluster where storage keeps up.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from l2c.cache import (
    REJECTED_DIR,
    CacheError,
    ShardEntry,
    TextCache,
    arrow_schema,
    open_cache_store,
    write_shard_file,
)
from l2c.config import ConfigError
from l2c.errors import L2CError
from l2c.memory import peak_rss_mb
from l2c.storage import Store

WORK = ".tmp-align"  # the job's work folder inside --out (a `.tmp-` name: removed by the next run's start)
ROW_COLUMNS = ("key", "field", "embedding", "n_tokens", "truncated")


@dataclass
class AlignConfig:
    """What `align-cache` needs; the CLI flags map one to one onto these fields."""

    text_cache: str = ""
    images: list[str] = field(default_factory=list)
    out: str = ""
    partition_mb: float = 1024
    ray_address: str | None = None
    runner: str = "auto"  # auto | local | ray (pipeline/runner.py); auto: this process unless Ray is addressed
    progress: bool = True

    def validate(self) -> None:
        from l2c.pipeline.runner import check_runner

        for what, value in (("--text-cache", self.text_cache), ("--images", self.images), ("--out", self.out)):
            if not value:
                raise ConfigError(f"align-cache needs {what}")
        if not self.partition_mb > 0:
            raise ConfigError(f"--partition-mb must be positive, got {self.partition_mb}")
        check_runner(self.runner, self.ray_address)


def _read_table(store: Store, rel: str, columns=None) -> pa.Table:
    return pq.read_table(store.path(rel), columns=columns, filesystem=None if store.local else store.fs)


def _write_table(store: Store, rel: str, table: pa.Table) -> None:
    store.write_file(rel, lambda tmp: pq.write_table(table, tmp, compression="none"))


def _load_array(store: Store, rel: str) -> np.ndarray:
    if store.local:
        return np.load(store.path(rel), mmap_mode="r")
    import io

    return np.load(io.BytesIO(store.read_bytes(rel)))


def _save_array(store: Store, rel: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    store.write_file(rel, write)


def _hashes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 hash of each key (`crosscheck.key_hashes`, computed once per distinct key)."""
    from l2c.pipeline.crosscheck import key_hashes

    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    enc = pc.dictionary_encode(keys)
    return key_hashes(enc.dictionary.to_pylist())[enc.indices.to_numpy(zero_copy_only=False)]


# ---------------------------------------------------------------- stage 1: each tar's keys
def read_keys(batch: pa.Table, work: str) -> dict:
    """One tar's keys in order (a key seen twice at its first place), written to the work folder; returns their
    hashes, the keys seen twice, and what was wrong with the tar (damaged after some samples, or unreadable)."""
    from l2c.data.shards import read_tar
    from l2c.pipeline.crosscheck import key_hashes

    store = open_cache_store(work)
    out: dict[str, list] = {"slot": [], "hashes": [], "n_keys": [], "dup_keys": [], "damage": [], "failed": [],
                            "rss_mb": []}  # fmt: skip
    for slot, url in zip(batch["slot"].to_pylist(), batch["tar"].to_pylist(), strict=True):
        rejects: list = []
        keys = [s.key for s in read_tar(url, rejects)]
        damage = next((r.detail for r in rejects if r.reason == "unreadable_tar"), "")
        first = list(dict.fromkeys(keys))
        if keys or not damage:
            _write_table(store, f"keys/{slot:06d}.parquet", pa.table({"key": pa.array(first, pa.string())}))
        out["slot"].append(slot)
        out["hashes"].append(key_hashes(first).astype("<u8").tobytes())
        out["n_keys"].append(len(first))
        out["dup_keys"].append(json.dumps(sorted(k for k, n in Counter(keys).items() if n > 1)))
        out["damage"].append(damage if keys else "")
        out["failed"].append(damage if not keys else "")
        out["rss_mb"].append(peak_rss_mb())
    return out


# ---------------------------------------------------------------- stage 2: route C's rows to partitions
def route_rows(batch: pa.Table, work: str, cache_dir: str) -> dict:
    """C's shards of this batch, a row group at a time: each row looked up in the key index and kept, with its
    (tar, position, C's row order), for the partition of its tar; one file per partition at the end."""
    store = open_cache_store(work)
    plan = json.loads(store.read_text("plan.json"))
    index = {n: _load_array(store, f"index/{n}.npy") for n in ("hash", "slot", "pos")}
    part_of = np.asarray(plan["part_of_slot"], np.int64)
    cache = TextCache(cache_dir)
    ordinal = {name: i for i, name in enumerate(plan["cache_shards"])}
    stats = {"rows_in": 0, "rows_routed": 0, "rows_not_routed": 0}
    for m, names in zip(batch["m"].to_pylist(), batch["shards"].to_pylist(), strict=True):
        buffers: dict[int, list[pa.Table]] = {}
        for name in json.loads(names):
            offset = 0
            for b in cache.iter_batches(name, list(ROW_COLUMNS)):
                if b.schema.field("embedding").type.list_size != plan["dim"]:
                    raise CacheError(f"text cache {cache.dir}: shard {name} holds "
                                     f"{b.schema.field('embedding').type.list_size}-dim vectors, the manifest "
                                     f"says dim={plan['dim']}; the cache is damaged or mixed")  # fmt: skip
                _route(pa.Table.from_batches([b]), (ordinal[name] << 40) + offset, index, part_of, buffers, stats)
                offset += b.num_rows
        for p, parts in buffers.items():
            _write_table(store, f"rows/{p:05d}/{m:06d}.parquet", pa.concat_tables(parts))
    return {"m": batch["m"].to_pylist(), "stats": [json.dumps({**stats, "rss_mb": peak_rss_mb()})]}


def _route(t: pa.Table, seq0: int, index: dict, part_of: np.ndarray, buffers: dict, stats: dict) -> None:
    h = _hashes(t.column("key"))
    lo = np.searchsorted(index["hash"], h, "left")
    hi = np.searchsorted(index["hash"], h, "right")
    count = hi - lo  # a key in several tars (or a hash shared by two keys): the row goes to each
    stats["rows_in"] += t.num_rows
    stats["rows_not_routed"] += int(np.count_nonzero(count == 0))
    rows = np.repeat(np.arange(t.num_rows), count)
    if not len(rows):
        return
    entry = np.repeat(lo, count) + (np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count))
    slot = np.asarray(index["slot"][entry])
    part = part_of[slot]
    stats["rows_routed"] += len(rows)
    taken = t.take(pa.array(rows))
    taken = taken.append_column("slot", pa.array(slot.astype(np.int32)))
    taken = taken.append_column("pos", pa.array(np.asarray(index["pos"][entry]).astype(np.int32)))
    taken = taken.append_column("seq", pa.array(seq0 + rows.astype(np.int64)))
    for p in np.unique(part):
        buffers.setdefault(int(p), []).append(taken.filter(pa.array(part == p)))


# ---------------------------------------------------------------- stage 3: each partition's tars written
def write_partition(batch: pa.Table, work: str, out_dir: str) -> dict:
    """The rows routed to one partition, sorted; each of its tars' shards (and rejects) written atomically."""
    store, out = open_cache_store(work), open_cache_store(out_dir)
    plan = json.loads(store.read_text("plan.json"))
    schema = arrow_schema(plan["dim"], plan["store_dtype"])
    res: dict[str, list] = {"shard": [], "result": []}
    for p in batch["part"].to_pylist():
        files = store.list(f"rows/{p:05d}", ".parquet")
        parts = [_read_table(store, f"rows/{p:05d}/{f}") for f in files]
        rows = pa.concat_tables(parts) if parts else None
        del parts
        if rows is not None:
            rows = rows.take(pc.sort_indices(rows, [("slot", "ascending"), ("pos", "ascending"), ("seq", "ascending")]))
        slots = rows.column("slot").to_numpy() if rows is not None else np.zeros(0, np.int32)
        for tar in plan["tars"]:
            if tar["part"] != p:
                continue
            lo, hi = np.searchsorted(slots, tar["slot"], "left"), np.searchsorted(slots, tar["slot"], "right")
            mine = rows.slice(lo, hi - lo) if rows is not None else None
            entry, rejects = _write_tar_shard(store, out, tar, mine, schema)
            res["shard"].append(tar["name"])
            res["result"].append(json.dumps({"entry": asdict(entry), "rejects": Counter(r["reason"] for r in rejects),
                                             "rss_mb": peak_rss_mb()}))  # fmt: skip
    return res


def _write_tar_shard(work: Store, out: Store, tar: dict, rows: pa.Table | None, schema: pa.Schema):
    keys = _read_table(work, f"keys/{tar['slot']:06d}.parquet").column("key").combine_chunks()
    if rows is not None and rows.num_rows:
        same = pc.equal(rows.column("key"), pc.take(keys, rows.column("pos"))).to_numpy(zero_copy_only=False)
        rows = rows.filter(pa.array(same))  # a hash shared by two keys: only the key itself pairs
        rows = rows.take(pa.array(_last_of_each(rows)))
    else:
        rows = pa.table({c: pa.array([], schema.field(c).type) for c in ROW_COLUMNS} | {"pos": pa.array([], pa.int32())})
    has = np.zeros(len(keys), bool)
    has[rows.column("pos").to_numpy()] = True
    rejects = [{"shard": tar["name"], "source": tar["url"], "key": k, "field": None, "reason": "no_vector",
                "detail": "the text cache holds no row of this key"}
               for k, h in zip(keys.to_pylist(), has, strict=True) if not h]  # fmt: skip
    rejects += [{"shard": tar["name"], "source": tar["url"], "key": k, "field": None, "reason": "duplicate_key",
                 "detail": "key seen again later in this tar: its rows are at its first place"}
                for k in tar["dup_keys"]]  # fmt: skip
    if tar["damage"]:
        rejects.append({"shard": tar["name"], "source": tar["url"], "key": None, "field": None,
                        "reason": "damaged_tar", "detail": tar["damage"]})  # fmt: skip
    out.write_text(f"{REJECTED_DIR}/{tar['name']}.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    table = rows.select(list(ROW_COLUMNS)).cast(schema)
    n_rows, digest = write_shard_file(out, f"{tar['name']}.parquet", table)
    entry = ShardEntry(file=f"{tar['name']}.parquet", source=tar["url"], rows=n_rows, sha256=digest,
                       n_rejected=len(rejects), n_truncated=int(pc.sum(table.column("truncated")).as_py() or 0),
                       n_tokens=int(pc.sum(table.column("n_tokens")).as_py() or 0), partial=bool(tar["damage"]))  # fmt: skip
    return entry, rejects


def _last_of_each(rows: pa.Table) -> np.ndarray:
    """Row numbers keeping, of each (position, field), the last row in C's order; rows are in (pos, seq) order."""
    pos = rows.column("pos").to_numpy()
    fld = pc.dictionary_encode(rows.column("field").combine_chunks()).indices.to_numpy(zero_copy_only=False)
    seq = rows.column("seq").to_numpy()
    order = np.lexsort((seq, fld, pos))
    p, f = pos[order], fld[order]
    last = np.ones(len(order), bool)
    last[:-1] = (p[:-1] != p[1:]) | (f[:-1] != f[1:])
    return np.sort(order[last])


# ---------------------------------------------------------------- driver
def alignment_settings(cache: TextCache, tars: list[str]) -> dict:
    """C's settings as the typed record carries them (teacher, fields, key field), plus what this cache aligns."""
    from l2c.meta import TextCacheSettings

    digest = hashlib.sha256("\n".join(tars).encode()).hexdigest()
    return {**TextCacheSettings.from_dict(cache.settings).to_dict(),
            "aligned": {"text_cache": cache.dir, "tars": len(tars), "tars_sha256": digest}}  # fmt: skip


def run_align(cfg: AlignConfig) -> dict:
    """Align the text cache `cfg.text_cache` to the tars `cfg.images` into `cfg.out`; returns a summary."""
    from l2c.data.shards import ShardSpecError, expand_shards
    from l2c.pipeline.embed_job import assemble_rejects, open_manifest, open_output, shards_to_do
    from l2c.pipeline.runner import Runner
    from l2c.pipeline.sources import shard_names

    cfg.validate()
    cache = TextCache(cfg.text_cache)
    if not cache.shard_names:
        raise CacheError(f"text cache {cache.dir} has no shards: nothing to align")
    try:
        tars = expand_shards(cfg.images, require_suffix=True, what="image shard")
    except ShardSpecError as e:
        raise L2CError(str(e)) from None
    if open_cache_store(cfg.out).url == cache.store.url:
        raise ConfigError(f"--out {cfg.out} is the text cache itself: align it into a new folder")
    names = shard_names(tars)
    settings = alignment_settings(cache, tars)
    out, lock = open_output(cfg.out, "align-cache")
    runner, t0 = None, time.time()
    work = Store(f"{out.url}/{WORK}")
    try:
        manifest = open_manifest(out, settings, overwrite=False)  # another teacher or fields: refused, naming keys
        manifest.save(out)  # the journal of a killed run folded in
        _clear(work)
        todo = shards_to_do(manifest, out, tars, names)
        runner = Runner.start(cfg.runner, cfg.ray_address, lambda gpus, cpus: True)
        tally = Tally()
        if todo:
            _align(cfg, cache, todo, names, runner, work, out, manifest, tally)
        manifest.save(out)  # the journal folded into manifest.json
        n_rejects = assemble_rejects(out, [names[t] for t in tars])
    finally:
        if runner is not None:
            runner.stop()
        _clear(work)
        lock.release()
    entries = [manifest.shards[names[t]] for t in tars if names[t] in manifest.shards]
    elapsed = time.time() - t0
    return {"out": out.url, "text_cache": cache.dir, "tars": len(tars), "shards_written": tally.written,
            "shards_skipped": len(tars) - len(todo), "shards_failed": tally.failed, "shards_partial": tally.partial,
            "rows": sum(e.rows for e in entries), "rows_written": tally.rows, "rejected": n_rejects,
            "rejected_by_reason_this_run": tally.reasons, "cache_rows_not_routed": tally.stats["rows_not_routed"],
            "cache_rows_read": tally.stats["rows_in"], "partitions": tally.partitions, "seconds": elapsed,
            "seconds_per_shard": elapsed / max(1, tally.written), "peak_rss_mb": tally.rss, "dim": cache.dim,
            "runner": runner.name if runner else cfg.runner}  # fmt: skip


def _clear(work: Store) -> None:
    """Remove the work folder (this job's own: `.tmp-align` inside --out)."""
    if work.local:
        import shutil

        shutil.rmtree(work.root, ignore_errors=True)
    elif work.fs.exists(work.path()):
        work.fs.rm(work.path(), recursive=True)


@dataclass
class Tally:
    """What the summary needs, summed as results arrive."""

    written: int = 0
    rows: int = 0
    partitions: int = 0
    rss: dict = field(default_factory=lambda: {"keys": 0.0, "route": 0.0, "write": 0.0})
    stats: dict = field(default_factory=lambda: {"rows_in": 0, "rows_routed": 0, "rows_not_routed": 0})
    reasons: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    partial: list = field(default_factory=list)

    def reject(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n


def _align(cfg: AlignConfig, cache: TextCache, todo: list[str], names: dict, runner, work: Store, out: Store,
           manifest, tally: Tally) -> None:  # fmt: skip
    from l2c.pipeline.runner import Stage
    from l2c.progress import track

    slots = {url: i for i, url in enumerate(todo)}
    found: dict[int, dict] = {}
    with track("align-cache: tar keys", len(todo), "tars", enabled=cfg.progress) as advance:
        for row in runner.run([{"slot": i, "tar": url} for url, i in slots.items()],
                              [Stage(read_keys, kwargs={"work": work.url})]):  # fmt: skip
            found[row["slot"]] = row
            tally.rss["keys"] = max(tally.rss["keys"], row["rss_mb"])
            advance(1)
    tars = []
    for url, i in slots.items():
        r = found[i]
        if r["failed"]:
            tally.failed.append(names[url])
            tally.reject("unreadable_tar")
            out.write_text(f"{REJECTED_DIR}/{names[url]}.jsonl", json.dumps({
                "shard": names[url], "source": url, "key": None, "field": None, "reason": "unreadable_tar",
                "detail": r["failed"]}) + "\n")  # fmt: skip
            continue
        tars.append({"slot": i, "url": url, "name": names[url], "n_keys": r["n_keys"],
                     "dup_keys": json.loads(r["dup_keys"]), "damage": r["damage"]})  # fmt: skip
    if not tars:
        return
    row_bytes = cache.dim * (2 if cache.settings.get("store_dtype", "float16") == "float16" else 4) + 64
    budget = cfg.partition_mb * (1 << 20)
    n_parts = int(min(len(tars), max(1, -(-len(cache) * row_bytes // budget))))
    total = max(1, sum(t["n_keys"] for t in tars))
    before = 0
    for t in tars:  # consecutive tars, about the same number of keys per partition
        t["part"] = min(n_parts - 1, before * n_parts // total)
        before += t["n_keys"]
    tally.partitions = n_parts
    _write_index(work, cache, tars, found, n_parts)
    found.clear()

    batches, current, size = [], [], 0  # C's shards in batches of about one partition of vectors
    for name in cache.shard_names:
        current.append(name)
        size += cache.manifest.shards[name].rows * row_bytes
        if size >= budget:
            batches.append(current)
            current, size = [], 0
    batches += [current] if current else []
    with track("align-cache: route rows", len(batches), "batches", enabled=cfg.progress) as advance:
        for row in runner.run([{"m": j, "shards": json.dumps(b)} for j, b in enumerate(batches)],
                              [Stage(route_rows, kwargs={"work": work.url, "cache_dir": cache.dir})]):  # fmt: skip
            s = json.loads(row["stats"])
            tally.rss["route"] = max(tally.rss["route"], s.pop("rss_mb"))
            for k, v in s.items():
                tally.stats[k] += v
            advance(1)
    parts = sorted({t["part"] for t in tars})
    with track("align-cache: write shards", len(tars), "shards", enabled=cfg.progress) as advance:
        for row in runner.run([{"part": p} for p in parts],
                              [Stage(write_partition, kwargs={"work": work.url, "out_dir": out.url})]):  # fmt: skip
            res = json.loads(row["result"])
            entry = ShardEntry(**res["entry"])
            manifest.record(out, row["shard"], entry)  # flat cost per shard
            tally.written += 1
            tally.rows += entry.rows
            tally.rss["write"] = max(tally.rss["write"], res["rss_mb"])
            if entry.partial:
                tally.partial.append(row["shard"])
            for k, v in res["rejects"].items():
                tally.reject(k, v)
            advance(1)


def _write_index(work: Store, cache: TextCache, tars: list[dict], found: dict, n_parts: int) -> None:
    """The sorted key index (hash -> tar slot, position) and the plan every task reads."""
    hashes = [np.frombuffer(found[t["slot"]]["hashes"], "<u8") for t in tars]
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    slot = np.concatenate([np.full(len(x), t["slot"], np.int32) for x, t in zip(hashes, tars, strict=True)])
    pos = np.concatenate([np.arange(len(x), dtype=np.int32) for x in hashes])
    del hashes
    order = np.argsort(h, kind="stable")
    for name, arr in (("hash", h[order].astype(np.uint64)), ("slot", slot[order]), ("pos", pos[order])):
        _save_array(work, f"index/{name}.npy", arr)
    part_of = [-1] * (max(t["slot"] for t in tars) + 1)
    for t in tars:
        part_of[t["slot"]] = t["part"]
    plan = {"dim": cache.dim, "store_dtype": cache.settings.get("store_dtype", "float16"), "parts": n_parts,
            "cache_shards": cache.shard_names, "part_of_slot": part_of, "tars": tars}  # fmt: skip
    work.write_text("plan.json", json.dumps(plan))
