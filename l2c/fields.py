"""Field specs: where a caption lives in a record, and which cache rows a spec names. One grammar for every stage.

A spec is an optional member, then a path of keys, list indices and at most one `[*]`:

    txt                          a tar member (bytes -> UTF-8) or a table column
    json:long_caption            a key inside a JSON member (tar) or a JSON-string column (table)
    captions[0]                  a list element
    captions[*]                  every element present: one row each, named captions[0], captions[1], ...
    json:conversations[*].value  a key inside every element (ShareGPT4V's layout)
    meta.dense.text              nested keys

`embed-captions --text-field`, the cache's `fields`, `train-vision`'s `data.caption_weights` keys and the eval
commands' `--text-field` all take this grammar. A cache row's field is the spec with `[*]` replaced by the
element's index (`json:conversations[3].value`); `covers(spec, row)` says whether a spec names a row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from l2c.errors import L2CError

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+|\*)\]")
MISSING = object()  # the leaf of a path that does not exist in a record
BAD_JSON = object()  # a JSON member or column that does not parse


class FieldSpecError(L2CError, ValueError):
    """A field spec that does not follow the grammar."""


@dataclass(frozen=True)
class FieldSpec:
    """A parsed field spec: optional member (`json`), then a path of keys / indices / `*`."""

    spec: str
    member: str | None
    path: tuple

    @classmethod
    def parse(cls, spec: str) -> FieldSpec:
        return _parse(str(spec))

    @property
    def star(self) -> bool:
        return "*" in self.path

    def covers(self, row: str) -> bool:
        """Whether the cache row field `row` comes from this spec (itself, or an element of its `[*]`)."""
        if row == self.spec:
            return True
        if not self.star:
            return False
        try:
            other = _parse(row)
        except FieldSpecError:
            return False
        return (other.member == self.member and len(other.path) == len(self.path)
                and all(a == b or (a == "*" and isinstance(b, int)) for a, b in zip(self.path, other.path, strict=True)))  # fmt: skip

    def extract(self, record: dict) -> list[tuple[str, object]]:
        """[(row field, leaf)] of `record`: one pair, or one per element for `[*]`. A missing leaf is `MISSING`,
        an unparsable JSON member `BAD_JSON` (named as element 0 for a `[*]` spec)."""
        if self.member is None:
            return _walk(record, self.path, self.spec)
        raw = record.get(self.member, MISSING)
        if isinstance(raw, (bytes, bytearray, str)):
            try:
                raw = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                return [(self.spec.replace("[*]", "[0]"), BAD_JSON)]
        return _walk(raw, self.path, self.spec) if raw is not MISSING else [(self.spec, MISSING)]


@lru_cache(maxsize=4096)
def _parse(spec: str) -> FieldSpec:
    member, _, rest = spec.partition(":") if ":" in spec else (None, "", spec)
    path: list = []
    pos = 0
    for m in _TOKEN.finditer(rest):
        if m.start() != pos and rest[pos : m.start()] != ".":
            raise FieldSpecError(f"bad field spec {spec!r}")
        pos = m.end()
        if m.group(1) is not None:
            path.append(m.group(1))
        else:
            path.append("*" if m.group(2) == "*" else int(m.group(2)))
    if not path or pos != len(rest) or isinstance(path[0], int) or path[0] == "*":
        raise FieldSpecError(f"bad field spec {spec!r}: expected e.g. txt, json:long_caption, captions[0], captions[*]")
    if path.count("*") > 1:
        raise FieldSpecError(f"field spec {spec!r}: at most one [*]")
    return FieldSpec(spec, member or None, tuple(path))


def _walk(value, path: tuple, name: str) -> list[tuple[str, object]]:
    """Follow `path` into value; returns [(row field, leaf)], several for `[*]`; a leaf may be MISSING."""
    for i, step in enumerate(path):
        if step == "*":
            if not isinstance(value, list):
                return [(name, MISSING)]
            prefix, suffix = name.split("[*]", 1)
            out = []
            for j, item in enumerate(value):
                out += _walk(item, path[i + 1 :], f"{prefix}[{j}]{suffix}")
            return out
        if isinstance(step, int):
            value = value[step] if isinstance(value, list) and -len(value) <= step < len(value) else MISSING
        else:
            value = value.get(step, MISSING) if isinstance(value, dict) else MISSING
        if value is MISSING:
            return [(name, MISSING)]
    return [(name, value)]


def covers(spec: str, row: str) -> bool:
    """Whether field spec `spec` names the cache row field `row` (see `FieldSpec.covers`)."""
    return FieldSpec.parse(spec).covers(row)


def check_known(requested: Iterable[str], known: list[str], where: str) -> None:
    """Refuse a spec that names none of a cache's fields (a recorded spec, or one row of a `[*]` spec)."""
    for f in requested:
        FieldSpec.parse(f)
        if f not in known and not any(covers(k, f) or covers(f, k) for k in known):
            raise FieldSpecError(f"field {f!r} is not in {where}; it holds {', '.join(known)}")


def row_mask(rows: list[str], requested: Iterable[str]) -> np.ndarray:
    """Which of `rows` (cache row fields) one of the `requested` specs names; computed once per distinct row."""
    specs = [FieldSpec.parse(f) for f in requested]
    hit = {name: any(s.covers(name) for s in specs) for name in set(rows)}
    return np.fromiter((hit[r] for r in rows), bool, len(rows))
