"""The one reader of caption records: JSONL (also `.json`, one object a line) and Parquet, local or fsspec URLs.

A JSONL line that is not valid JSON (or not UTF-8), or not a JSON object, is a counted `BadRecord` with its
line number, never an exception; blank lines are skipped. Parquet rows come in file order, numbered from 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class BadRecord:
    """A line that is not a record: `reason` is `bad_json` (not JSON, not UTF-8) or `not_object`."""

    source: str
    line: int
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.detail}"


def _open(source: str | Path) -> IO[bytes]:
    from l2c.storage import is_url, normalize

    s = normalize(source)
    if is_url(s):
        import fsspec

        return fsspec.open(s, "rb").open()
    return open(Path(s).expanduser(), "rb")


def iter_records(source: str | Path) -> Iterator[tuple[int, dict | BadRecord]]:
    """(line or row number, record) for every non-blank line / row, in order; bad lines as `BadRecord`."""
    name = str(source)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with _open(source) as f:
            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for rec in batch.to_pylist():
                    n += 1
                    yield n, rec
        return
    with _open(source) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError as e:
                yield lineno, BadRecord(name, lineno, "bad_json", f"not valid UTF-8: {e.reason}")
                continue
            except json.JSONDecodeError as e:
                yield lineno, BadRecord(name, lineno, "bad_json", f"not valid JSON: {e.msg}")
                continue
            if not isinstance(rec, dict):
                yield (
                    lineno,
                    BadRecord(name, lineno, "not_object", f"expected an object, got {type(rec).__name__}"),
                )
                continue
            yield lineno, rec


def read_records(source: str | Path, bad: list[BadRecord] | None = None) -> Iterator[dict]:
    """The records of `source` as dicts; bad lines are appended to `bad` (counted, not fatal)."""
    for _, rec in iter_records(source):
        if isinstance(rec, BadRecord):
            if bad is not None:
                bad.append(rec)
            continue
        yield rec
