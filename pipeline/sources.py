"""Caption sources: webdataset tars, JSONL and Parquet tables, read into (key, field, text) rows.

Field specs (`txt`, `json:long_caption`, `captions[*]`, `json:conversations[*].value`) follow `l2c.fields`.
Captions are kept exactly as written (newlines, runs of spaces); only an all-whitespace caption is rejected. Every caption that cannot become a row is returned as a reject with its reason; nothing is dropped quietly.
Tars and tables are read with `l2c.data` (`shards.read_tar`, `records.iter_records`), the readers train-vision
and eval use, so the cache's rows follow the very samples, in the very order, the image stream sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from l2c.data.records import RECORD_SUFFIXES, BadRecord, iter_records
from l2c.data.shards import TAR_SUFFIXES, ShardSpecError, expand_shards, read_tar
from l2c.errors import L2CError
from l2c.fields import BAD_JSON, MISSING, FieldSpec
from l2c.storage import is_url

TABLE_SUFFIXES = RECORD_SUFFIXES


class SourceError(L2CError, ValueError):
    """A source or field spec that cannot be used."""


def expand_sources(specs: list[str]) -> list[str]:
    """Paths, directories, globs, brace ranges (`shard-{000..009}.tar`) and fsspec URLs → an ordered,
    de-duplicated list (`l2c.data.shards.expand_shards`, as train-vision and eval expand their tars)."""
    out = []
    for spec in specs:  # a directory of tar shards gives its tars only (make-shards writes info.json and
        # rejected.jsonl beside them); a directory without tars gives its JSONL/Parquet tables
        suffixes = TAR_SUFFIXES + TABLE_SUFFIXES
        p = Path(spec)
        if not is_url(str(spec)) and p.is_dir() and any(f.name.endswith(TAR_SUFFIXES) for f in p.iterdir()):
            suffixes = TAR_SUFFIXES
        try:
            out += expand_shards([spec], suffixes, require_suffix=True, what="source")
        except ShardSpecError as e:
            raise SourceError(str(e)) from None
    return list(dict.fromkeys(out))


def shard_names(sources: list[str]) -> dict[str, str]:
    """source → shard name (the file's stem; disambiguated with a short hash when stems collide)."""
    import hashlib

    stems = {s: re.sub(r"\.(tar\.gz|tgz|tar|jsonl|json|parquet)$", "", s.rsplit("/", 1)[-1]) for s in sources}
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {
        s: stem if counts[stem] == 1 else f"{stem}-{hashlib.sha1(s.encode()).hexdigest()[:8]}"
        for s, stem in stems.items()
    }


@dataclass
class ShardRows:
    """What one source shard yields: accepted rows in key order, and rejects with reasons."""

    keys: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    n_samples: int = 0
    partial: bool = False  # a damaged tar: the samples before the damage are here, the rest is lost


def _as_text(leaf) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if leaf is MISSING or leaf is None:
        return None, "missing_field"
    if isinstance(leaf, (bytes, bytearray)):
        try:
            leaf = bytes(leaf).decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(leaf, str):
        return None, "not_string"
    if not leaf.strip():
        return None, "empty"
    if "\ufffd" in leaf:
        return None, "invalid_utf8"
    return leaf, None  # exactly as written: newlines, runs of spaces and tabs reach the tokenizer


def read_shard(source: str, shard: str, text_fields: list[str], key_field: str = "key") -> ShardRows:
    """Read one source into rows (key order kept; fields in spec order per key) plus counted rejects."""
    specs = [FieldSpec.parse(f) for f in text_fields]
    is_tar = source.endswith(TAR_SUFFIXES)
    rows = ShardRows()
    seen: set[str] = set()

    def reject(key, fld, reason, detail=""):
        rows.rejects.append(
            {"shard": shard, "source": source, "key": key, "field": fld, "reason": reason, "detail": detail}
        )

    tar_rejects: list = []  # from the shared tar reader: duplicate_member, unreadable_tar
    done = 0

    def tar_rejected() -> None:
        """The reader's new rejects, in stream order: a rejected sample is counted; a tar damaged after some
        readable samples keeps them (the shard is partial); one with nothing readable raises."""
        nonlocal done
        for r in tar_rejects[done:]:
            if r.reason == "unreadable_tar":
                if rows.n_samples == 0:
                    raise OSError(r.detail)
                rows.partial = True
                reject(None, None, "damaged_tar", r.detail)
                continue
            rows.n_samples += 1
            reject(r.key, None, r.reason, r.detail)
        done = len(tar_rejects)

    try:
        records = read_tar(source, tar_rejects) if is_tar else (rec for _, rec in iter_records(source))
        for rec in records:
            tar_rejected()
            rows.n_samples += 1
            if isinstance(rec, BadRecord):
                reject(None, None, "bad_record", f"line {rec.line}: {rec.detail}")
                continue
            key = rec.get("__key__") if is_tar else rec.get(key_field)
            if key is None or (isinstance(key, str) and not key.strip()):
                reject(None, None, "missing_key", f"record {rows.n_samples} has no {key_field!r}")
                continue
            key = str(key)
            if key in seen:
                reject(key, None, "duplicate_key", "key already seen in this source")
                continue
            seen.add(key)
            for name, leaf in (pair for fs in specs for pair in fs.extract(rec)):
                if leaf is BAD_JSON:
                    reject(key, name, "invalid_json")
                    continue
                text, why = _as_text(leaf)
                if why:
                    reject(key, name, why)
                else:
                    rows.keys.append(key)
                    rows.fields.append(name)
                    rows.texts.append(text)
        tar_rejected()
    except Exception as e:  # unreadable or truncated shard: the whole shard is reported, nothing written
        return ShardRows(
            rejects=[{"shard": shard, "source": source, "key": None, "field": None,
                      "reason": "unreadable_shard", "detail": f"{type(e).__name__}: {str(e)[:200]}"}],
            n_samples=rows.n_samples,
        )  # fmt: skip
    return rows
