"""The text-embedding cache format: Parquet shards plus a self-describing `manifest.json`.

Layout of a cache directory::

    DIR/manifest.json          format, settings (model, fingerprint, pooling, ...), one entry per shard
    DIR/<shard>.parquet        key: string, field: string, embedding: fixed_size_list<float16|float32>[dim],
                               n_tokens: int32, truncated: bool   (rows in the source's key order)
    DIR/rejected/<shard>.jsonl captions that got no vector, with the reason (one file per shard)
    DIR/rejected.jsonl         all of the above, assembled when a job ends

DIR is a path, a `file://` URL or an object-store URL (`s3://`, `gs://`; see `l2c.storage`). Shards are
published atomically (temp name + rename on filesystems, one upload on object stores); the manifest is
updated after, so a shard listed in the manifest is always whole. Readers go through `TextCache`.

A job records each finished shard as one small file in `manifest.d/` and folds them into `manifest.json` at
its start and end. A process merges the journal once: `Manifest.load` keeps what it read per location and
reads again only when `manifest.json` or the journal's listing (names, sizes, times) has changed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from l2c.errors import L2CError
from l2c.fields import FieldSpecError, check_known, row_mask
from l2c.meta import TextCacheSettings
from l2c.storage import StorageError, Store, as_store, open_store
from l2c.teacher import TeacherSpec

FORMAT_NAME = "l2c-text-cache"
IMAGE_FORMAT_NAME = "l2c-image-cache"  # `l2c embed-images`; read through l2c.image_cache.ImageCache
FORMATS = {FORMAT_NAME: "text cache", IMAGE_FORMAT_NAME: "image cache"}
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL_DIR = "manifest.d"  # one file per shard finished since manifest.json was last written
REJECTED = "rejected.jsonl"
REJECTED_DIR = "rejected"
COLUMNS = ("key", "field", "embedding", "n_tokens", "truncated")
STORE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
ROW_GROUP_BYTES = 128 << 20  # vectors per Parquet row group: a reader of part of a large shard holds one group


class CacheError(L2CError, ValueError):
    """A cache that is missing, damaged, or does not match what the caller expects."""


def arrow_schema(dim: int, store_dtype: str = "float16") -> pa.Schema:
    if store_dtype not in STORE_DTYPES:
        raise CacheError(f"store dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("field", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(STORE_DTYPES[store_dtype], dim), nullable=False),
            pa.field("n_tokens", pa.int32(), nullable=False),
            pa.field("truncated", pa.bool_(), nullable=False),
        ]
    )


def embeddings_to_arrow(emb: np.ndarray, store_dtype: str) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float16 if store_dtype == "float16" else np.float32)
    n, dim = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)


def build_table(
    keys: list[str],
    fields: list[str],
    embeddings: np.ndarray,
    n_tokens,
    truncated,
    store_dtype: str = "float16",
) -> pa.Table:
    """One shard's rows as an Arrow table with the cache schema."""
    n = len(keys)
    if embeddings.ndim != 2 or embeddings.shape[0] != n or len(fields) != n:
        raise CacheError(f"rows disagree: {n} keys, {len(fields)} fields, embeddings {embeddings.shape}")
    dim = embeddings.shape[1]
    schema = arrow_schema(dim, store_dtype)
    return pa.Table.from_arrays(
        [
            pa.array(keys, pa.string()),
            pa.array(fields, pa.string()),
            embeddings_to_arrow(embeddings.reshape(n, dim), store_dtype),
            pa.array(np.asarray(n_tokens, dtype=np.int32)),
            pa.array(np.asarray(truncated, dtype=bool)),
        ],
        schema=schema,
    )


def write_shard_file(store: str | Path | Store, name: str, table: pa.Table) -> tuple[int, str]:
    """Write a shard atomically as `name` in `store`; returns (rows, sha256 of the file).

    Dictionary encoding only for `field` (a few distinct values): on the vectors it finds no repeats and
    costs more than half the write time (benchmarks/bench_node.py: 2.6x faster writes, 2.4x faster reads).
    """

    emb = table.schema.field("embedding").type if "embedding" in table.schema.names else None
    row_bytes = emb.list_size * emb.value_type.byte_width if emb is not None and emb.list_size else 1024
    group = max(1024, ROW_GROUP_BYTES // row_bytes)  # a shard of a large table is read a group at a time

    def write(tmp):
        compression = "zstd" if table.num_rows else "none"
        pq.write_table(table, tmp, compression=compression, use_dictionary=["field"], row_group_size=group)

    digest = as_store(store).write_file(name, write)
    return table.num_rows, digest


@dataclass
class ShardEntry:
    """One finished shard: where its rows came from and how to check the file."""

    file: str
    source: str
    rows: int
    sha256: str
    n_rejected: int = 0
    n_truncated: int = 0
    n_tokens: int = 0
    padded_tokens: int = 0
    partial: bool = False  # written from a damaged source: the rows before the damage (a rerun retries it)


@dataclass
class Manifest:
    """`manifest.json`: the settings that produced the vectors and the shards written so far."""

    settings: dict
    shards: dict[str, ShardEntry] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    l2c_version: str = ""

    def to_dict(self) -> dict:
        totals = {
            "shards": len(self.shards),
            "rows": sum(s.rows for s in self.shards.values()),
            "rejected": sum(s.n_rejected for s in self.shards.values()),
            "truncated": sum(s.n_truncated for s in self.shards.values()),
        }
        return {
            "format": self.format,
            "format_version": self.format_version,
            "l2c_version": self.l2c_version,
            "settings": self.settings,
            "totals": totals,
            "shards": {name: asdict(s) for name, s in sorted(self.shards.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if d.get("format") not in FORMATS:
            raise CacheError(f"not an l2c text cache (format={d.get('format')!r})")
        if int(d.get("format_version", -1)) > FORMAT_VERSION:
            raise CacheError(
                f"cache format version {d['format_version']} is newer than this l2c reads ({FORMAT_VERSION})"
            )
        shards = {k: ShardEntry(**v) for k, v in d.get("shards", {}).items()}
        return cls(
            settings=d["settings"],
            shards=shards,
            format=d["format"],
            format_version=int(d["format_version"]),
            l2c_version=d.get("l2c_version", ""),
        )

    def save(self, directory: str | Path | Store) -> None:
        """Write the whole manifest (settings and every shard) and drop the journal it now includes."""
        from l2c import __version__

        store = as_store(directory)
        self.l2c_version = __version__
        store.write_text(MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")
        for name in store.list(JOURNAL_DIR, ".json"):
            store.remove(f"{JOURNAL_DIR}/{name}")

    def record(self, directory: str | Path | Store, name: str, entry: ShardEntry) -> None:
        """Add one finished shard: a small journal file (`manifest.d/NAME.json`, atomic), so the cost per shard
        stays flat however many came before; `save` folds the journal into manifest.json at the end."""
        self.shards[name] = entry
        as_store(directory).write_text(f"{JOURNAL_DIR}/{name}.json", json.dumps({name: asdict(entry)}) + "\n")

    @classmethod
    def load(cls, directory: str | Path | Store) -> Manifest:
        """manifest.json plus the shards the journal records (a job killed before its final save).

        Read once per process and location: a later call returns a copy of what was read (settings copied, the
        `ShardEntry` objects shared: replace an entry, do not change it in place) while manifest.json and the
        journal's listing are unchanged, so a reader that opens the cache per shard costs two listings."""
        store = open_cache_store(directory)
        stamp = _stamp(store)
        if stamp is None:
            raise CacheError(f"{store} has no {MANIFEST}: not a text cache (run `l2c embed-captions`)")
        seen = _LOADED.get(store.url)
        if seen is None or seen[0] != stamp:
            seen = (stamp, cls._read(store, [name for name, *_ in stamp[1]]))
            _LOADED[store.url] = seen
        m = seen[1]
        return cls(settings=copy.deepcopy(m.settings), shards=dict(m.shards), format=m.format,
                   format_version=m.format_version, l2c_version=m.l2c_version)  # fmt: skip

    @classmethod
    def _read(cls, store: Store, journal: list[str]) -> Manifest:
        m = cls.from_dict(json.loads(store.read_text(MANIFEST)))
        for name in journal:
            try:
                for shard, entry in json.loads(store.read_text(f"{JOURNAL_DIR}/{name}")).items():
                    m.shards[shard] = ShardEntry(**entry)
            except (json.JSONDecodeError, TypeError, FileNotFoundError):
                continue  # written atomically, so only a foreign file lands here; its shard is redone
        return m


_LOADED: dict[str, tuple[tuple, Manifest]] = {}  # location -> (stamp, manifest and journal merged)
_STAMP_KEYS = ("size", "mtime", "ino", "ETag", "etag", "LastModified", "last_modified", "generation", "updated")


def _stamp(store: Store) -> tuple | None:
    """What changes when the manifest does: manifest.json's size, time and inode (or ETag), and the journal's
    file names with theirs; None without a manifest.json."""

    def mark(info: dict) -> tuple:
        return tuple(str(info[k]) for k in _STAMP_KEYS if k in info)

    def fresh(rel: str) -> str:
        path = store.path(rel)
        if not store.local:
            store.fs.invalidate_cache(path)  # other processes write here
        return path

    try:
        info = store.fs.info(fresh(MANIFEST))
    except FileNotFoundError:
        return None
    try:
        entries = store.fs.ls(fresh(JOURNAL_DIR), detail=True)
    except FileNotFoundError:
        entries = []
    journal = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and name.endswith(".json") and not name.startswith(".tmp-"):
            journal.append((name, *mark(e)))
    return mark(info), tuple(sorted(journal))


def open_cache_store(spec: str | Path | Store) -> Store:
    """The cache's location, opened; a bad URL or a missing fsspec package is a `CacheError`."""
    try:
        return open_store(spec)
    except StorageError as e:
        raise CacheError(str(e)) from e


class ShardFinder:
    """The shard of a source (by source path, then by file stem), from two lookups built once: O(shards) to
    build, O(1) per tar. `TextCache.shard_for_source` keeps one per manifest."""

    def __init__(self, cache: TextCache):
        self.shards, self.n = cache.manifest.shards, len(cache.manifest.shards)  # what it was built from
        self.by_source: dict[str, str] = {}
        for name, entry in cache.manifest.shards.items():
            self.by_source.setdefault(entry.source, name)  # the first shard of a source, in manifest order
        self.names = set(cache.manifest.shards)

    def __call__(self, source: str | Path) -> str | None:
        src = str(source)
        if src in self.by_source:
            return self.by_source[src]
        stem = Path(src).name.split(".")[0]
        return stem if stem in self.names else None


class TextCache:
    """Read access to a finished (or partly finished) text-embedding cache.

    >>> cache = TextCache("cache/")
    >>> cache.dim, cache.fields, len(cache)
    >>> keys, fields, vecs = cache.load()              # everything, as numpy
    >>> table = cache.read_shard("shard-000")          # one shard, as Arrow, rows in source order
    >>> found = cache.find_keys(["k1", "k2"])          # where some keys' rows are (key and field columns read)
    >>> for vecs in cache.read_vectors(found): ...     # their vectors, a row group at a time
    """

    FORMAT = FORMAT_NAME

    def __init__(self, directory: str | Path | Store):
        self.store = open_cache_store(directory)
        self.manifest = Manifest.load(self.store)
        self.settings = self.manifest.settings
        self._finder: ShardFinder | None = None  # shard_for_source's lookup, built on first use
        if self.manifest.format != self.FORMAT:
            raise CacheError(
                f"{self.store} is an l2c {FORMATS[self.manifest.format]}, not a {FORMATS[self.FORMAT]}"
            )

    def schema(self) -> pa.Schema:
        """The Arrow schema every non-empty shard of this cache has."""
        return arrow_schema(self.dim, self.settings.get("store_dtype", "float16"))

    @property
    def _arrow_fs(self):
        """None (Arrow's own, faster local reader) for local caches, else the fsspec filesystem."""
        return None if self.store.local else self.store.fs

    @property
    def dir(self) -> str:
        """The cache's location: an absolute path, or the URL of an object-store prefix."""
        return self.store.url

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    @property
    def fields(self) -> list[str]:
        return list(self.settings.get("fields", []))

    @property
    def fingerprint(self) -> str:
        return str(self.settings.get("model_fingerprint", ""))

    @property
    def meta(self) -> TextCacheSettings:
        """The manifest's settings, typed: the teacher, the caption fields, the key field."""
        return TextCacheSettings.from_dict(self.settings)

    @property
    def teacher(self) -> TeacherSpec:
        """The teacher that made these vectors (`l2c.teacher`); compare two with `TeacherSpec.check_same`."""
        return TeacherSpec.from_dict(self.settings)

    @property
    def shard_names(self) -> list[str]:
        return sorted(self.manifest.shards)

    def __len__(self) -> int:
        return sum(s.rows for s in self.manifest.shards.values())

    def shard_for_source(self, source: str | Path) -> str | None:
        """Name of the shard written from `source` (matched by path, then by file stem); O(1) per call."""
        shards, finder = self.manifest.shards, self._finder
        if finder is None or finder.shards is not shards or finder.n != len(shards):  # built afresh when
            finder = self._finder = ShardFinder(self)  # the manifest was replaced or recorded a shard since
        return finder(source)

    def read_shard(self, name: str, columns: list[str] | None = None) -> pa.Table:
        entry = self.manifest.shards[name]
        return pq.read_table(self.store.path(entry.file), columns=columns, filesystem=self._arrow_fs)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[tuple[str, pa.Table]]:
        for name in self.shard_names:
            yield name, self.read_shard(name, columns)

    def field_mask(self, names: list[str], requested: list[str]) -> np.ndarray:
        """Rows whose field is one of `requested`: a spec as the manifest lists it (`json:captions[*]` takes
        every element) or one row name (`json:captions[0]`). An unknown field is an error listing the known."""
        try:
            check_known(requested, self.fields, f"text cache {self.dir}")
        except FieldSpecError as e:
            raise CacheError(str(e)) from None
        return row_mask(names, requested)

    def load(self, fields: list[str] | None = None, dtype=np.float32) -> tuple[list[str], list[str], np.ndarray]:
        """All rows (optionally only some fields, see `field_mask`) as (keys, fields, embeddings[n, dim])."""
        keys: list[str] = []
        flds: list[str] = []
        parts: list[np.ndarray] = []
        for _, t in self.iter_tables(["key", "field", "embedding"]):
            if fields is not None:
                t = t.filter(pa.array(self.field_mask(t.column("field").to_pylist(), fields)))
            keys += t.column("key").to_pylist()
            flds += t.column("field").to_pylist()
            parts.append(embedding_matrix(t, dtype))
        emb = np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype)
        return keys, flds, emb

    def open_shard(self, name: str) -> pq.ParquetFile:
        """One shard's Parquet file, opened (its footer read) for streamed reading (`iter_batches`)."""
        return pq.ParquetFile(self.store.path(self.manifest.shards[name].file), filesystem=self._arrow_fs,
                              buffer_size=1 << 20, pre_buffer=False)  # fmt: skip

    def iter_batches(self, name: str, columns: list[str], row_groups: list[int] | None = None,
                     pf: pq.ParquetFile | None = None) -> Iterator[pa.RecordBatch]:  # fmt: skip
        """A shard's rows (of `row_groups`, all by default) in order, in batches of about `ROW_GROUP_BYTES` of
        vectors, streamed: a larger row group (caches written before groups were bounded) is never held whole."""
        pf = pf or self.open_shard(name)
        rows = max(1024, min(1 << 20, ROW_GROUP_BYTES // (self.dim * 4 or 1)))
        yield from pf.iter_batches(batch_size=rows, row_groups=row_groups, columns=columns, use_threads=False)

    def find_keys(self, keys: list[str], fields: list[str] | None = None) -> KeyRows:
        """Where the rows of `keys` (of the `fields` asked for, see `field_mask`; all when None) lie, in cache
        order. Reads the key and field columns only, a row group at a time, matched in batches of at least
        four times as many rows as keys (one hash table per batch): memory stays at one batch of keys."""
        if fields is not None:
            self.field_mask([], fields)  # an unknown field fails here, listing the cache's fields
        want = pa.array(list(keys), pa.string())
        found = _KeyMatcher(want, fields, max(1 << 21, 4 * len(want)))
        for name in self.shard_names:
            if not self.manifest.shards[name].rows:
                continue
            pf = self.open_shard(name)
            for group in range(pf.num_row_groups):
                found.add(name, group, pf.read_row_group(group, columns=["key", "field"]))
        return found.result()

    def read_vectors(self, found: KeyRows, dtype=np.float16) -> Iterator[np.ndarray]:
        """The vectors of `found`'s rows, in order, as [rows, dim] arrays: only the row groups that hold some are
        read, each streamed in batches (`iter_batches`)."""
        pf, shard = None, None
        for name, group, rows in found.pieces:
            if name != shard:
                pf, shard = self.open_shard(name), name
            start = 0
            for batch in self.iter_batches(name, ["embedding"], [group], pf):
                lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
                if hi > lo:
                    yield embedding_matrix(pa.Table.from_batches([batch]).take(pa.array(rows[lo:hi] - start)), dtype)
                start += batch.num_rows

    def shard_dim(self, name: str) -> int:
        """The vector length a shard's file holds (from its Parquet schema; no data read)."""
        schema = pq.read_schema(self.store.path(self.manifest.shards[name].file), filesystem=self._arrow_fs)
        return schema.field("embedding").type.list_size

    def check_dims(self, expected: int | None = None, part: tuple[int, int] = (0, 1)) -> None:
        """Refuse, with both numbers, shards whose vectors disagree with the manifest's dim or with `expected`.
        `part=(i, n)`: only every n-th shard from the i-th (n ranks share the footer reads of a large cache)."""
        if expected and expected != self.dim:
            raise CacheError(f"{FORMATS[self.FORMAT]} {self.dir} holds {self.dim}-dim vectors, {expected} expected")
        for name, entry in sorted(self.manifest.shards.items())[part[0] :: part[1]]:
            if entry.rows and (size := self.shard_dim(name)) != self.dim:
                raise CacheError(
                    f"{FORMATS[self.FORMAT]} {self.dir}: shard {name} holds {size}-dim vectors but the manifest says "
                    f"dim={self.dim}; the cache is damaged or mixed: re-embed into a new --out"
                )

    def rejected(self) -> list[dict]:
        out = []
        for name in self.store.list(REJECTED_DIR, ".jsonl"):
            text = self.store.read_text(f"{REJECTED_DIR}/{name}")
            out += [json.loads(line) for line in text.splitlines() if line.strip()]
        return out

    def validate(self) -> list[str]:
        """Check every shard against the manifest (file present, rows, dim, dtype, sha256). Returns problems."""
        problems = []
        for name, entry in sorted(self.manifest.shards.items()):
            if not self.store.exists(entry.file):
                problems.append(f"{name}: file {entry.file} is missing")
                continue
            digest = self.store.sha256(entry.file)
            if digest != entry.sha256:
                problems.append(f"{name}: sha256 {digest[:12]}… differs from manifest {entry.sha256[:12]}…")
                continue
            pf = pq.ParquetFile(self.store.path(entry.file), filesystem=self._arrow_fs)
            if pf.metadata.num_rows != entry.rows:
                problems.append(f"{name}: {pf.metadata.num_rows} rows, manifest says {entry.rows}")
            schema = pf.schema_arrow
            want = self.schema()
            if entry.rows and not schema.equals(want, check_metadata=False):
                got = schema.field("embedding").type if "embedding" in schema.names else None
                if got is not None and pa.types.is_fixed_size_list(got) and got.list_size != self.dim:
                    problems.append(f"{name}: {got.list_size}-dim vectors, manifest says dim={self.dim}")
                else:
                    problems.append(f"{name}: columns {schema.names} / {got} differ from the cache format's")
        return problems


@dataclass
class KeyRows:
    """Where the rows of some keys lie in a text cache (`TextCache.find_keys`), in cache order."""

    pieces: list[tuple[str, int, np.ndarray]]  # (shard, row group, row numbers in the group) with such rows
    key_index: np.ndarray  # [n] int64: the position of each row's key in the keys asked for
    field_index: np.ndarray  # [n] int32: each row's field, an index into `fields`
    fields: list[str]  # row field names (`json:captions[0]`, ...) of the fields asked for, in the order first met
    other_rows: int  # rows of the fields asked for whose key was not asked for (never read further)

    def __len__(self) -> int:
        return len(self.key_index)


class _KeyMatcher:
    """`find_keys`' batches: key and field columns gathered until `batch_rows`, then matched at once."""

    def __init__(self, want: pa.Array, fields: list[str] | None, batch_rows: int):
        self.want, self.fields, self.batch_rows = want, fields, batch_rows
        self.names: list[str] = []  # row field names met, allowed or not
        self.allowed: list[bool] = []
        self.pending: list[tuple[str, int, pa.Table]] = []
        self.pieces: list[tuple[str, int, np.ndarray]] = []
        self.key_parts: list[np.ndarray] = []
        self.field_parts: list[np.ndarray] = []
        self.other = 0

    def add(self, shard: str, group: int, table: pa.Table) -> None:
        self.pending.append((shard, group, table))
        if sum(t.num_rows for *_, t in self.pending) >= self.batch_rows:
            self._match()

    def _codes(self, field_col: pa.ChunkedArray) -> np.ndarray:
        for name in pc.unique(field_col).to_pylist():
            if name not in self.names:
                self.names.append(name)
                self.allowed.append(self.fields is None or bool(row_mask([name], self.fields)[0]))
        return pc.index_in(field_col, value_set=pa.array(self.names, pa.string())).to_numpy(zero_copy_only=False)

    def _match(self) -> None:
        if not self.pending:
            return
        keys = pa.chunked_array([t.column("key").combine_chunks() for *_, t in self.pending], pa.string())
        flds = pa.chunked_array([t.column("field").combine_chunks() for *_, t in self.pending], pa.string())
        key_idx = pc.index_in(keys, value_set=self.want).fill_null(-1).to_numpy(zero_copy_only=False)
        codes = self._codes(flds)
        ok = np.asarray(self.allowed, bool)[codes]
        self.other += int(np.count_nonzero(ok & (key_idx < 0)))
        hit = ok & (key_idx >= 0)
        start = 0
        for shard, group, t in self.pending:
            rows = np.flatnonzero(hit[start : start + t.num_rows])
            if len(rows):
                self.pieces.append((shard, group, rows))
                self.key_parts.append(key_idx[start + rows].astype(np.int64))
                self.field_parts.append(codes[start + rows].astype(np.int32))
            start += t.num_rows
        self.pending = []

    def result(self) -> KeyRows:
        self._match()
        key_index = np.concatenate(self.key_parts) if self.key_parts else np.zeros(0, np.int64)
        codes = np.concatenate(self.field_parts) if self.field_parts else np.zeros(0, np.int32)
        kept = [i for i, ok in enumerate(self.allowed) if ok]  # the fields asked for, in the order first met
        remap = np.zeros(len(self.names), np.int32)
        remap[kept] = np.arange(len(kept), dtype=np.int32)
        return KeyRows(self.pieces, key_index, remap[codes], [self.names[i] for i in kept], self.other)


def embedding_matrix(table: pa.Table, dtype=np.float32) -> np.ndarray:
    """The `embedding` column of a cache table as a dense [rows, dim] numpy array."""
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(dtype, copy=False)
