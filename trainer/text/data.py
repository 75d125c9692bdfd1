"""Positive pairs for caption-contrastive training: captions grouped by image, sampled one pair per image.

Sources: JSONL (one record per image, or per caption: records with the same key are merged), Parquet (a
list column of captions, or one caption per row), a directory of those, or a text cache directory (its
manifest names the source files its shards were embedded from).

Sampling is a pure function of (seed, step): step s of epoch e takes the next slice of a per-epoch
permutation of the images, and two different captions of each. An image therefore gives at most one pair
per batch, resuming needs only the step, and every worker computes the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l2c.data.records import read_records
from l2c.errors import L2CError

KEY_FIELDS = ("image_id", "key", "id", "image", "__key__")
CAPTION_FIELDS = ("captions", "texts", "caption", "text", "sentences")


class PairDataError(L2CError, ValueError):
    """Caption sources that cannot give positive pairs."""


@dataclass
class CaptionGroup:
    key: str
    captions: list[str]


@dataclass
class LoadReport:
    """What reading the caption sources kept and dropped, and why."""

    sources: list[str] = field(default_factory=list)
    records: int = 0
    images: int = 0  # groups with at least two distinct captions
    captions: int = 0
    skipped_few_captions: int = 0  # images left with fewer than two distinct usable captions
    dropped_empty: int = 0  # captions empty or shorter than min_chars
    dropped_duplicate: int = 0  # a caption repeated verbatim within one image
    dropped_not_text: int = 0  # caption values that are not strings
    skipped_no_key: int = 0  # records without a key field
    merged_records: int = 0  # records whose key had been seen already (caption-per-row layouts)
    skipped_bad_lines: int = 0  # JSONL lines that are not JSON objects
    bad_lines: list[str] = field(default_factory=list)  # the first few, as `file:line: reason`

    def summary(self) -> str:
        dropped = [
            f"{n} {what}"
            for n, what in (
                (self.skipped_few_captions, "images with < 2 usable captions"),
                (self.dropped_empty, "empty/short captions"),
                (self.dropped_duplicate, "duplicate captions"),
                (self.dropped_not_text, "non-text captions"),
                (self.skipped_no_key, "records without a key"),
                (self.skipped_bad_lines, f"bad lines, first {self.bad_lines[0]}" if self.bad_lines else "bad lines"),
            )
            if n
        ]
        return f"{self.images} images, {self.captions} captions" + (
            f" (skipped: {', '.join(dropped)})" if dropped else ""
        )


def expand_sources(sources: list[str | Path]) -> list[Path]:
    """Files behind each source: a file, a directory of .jsonl/.parquet, or a text cache directory; globs and
    brace ranges as `l2c.data.shards.expand_shards` reads them."""
    from l2c.data.records import RECORD_SUFFIXES
    from l2c.data.shards import expand_shards

    out: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if (p / "manifest.json").exists():
            from l2c.cache import Manifest

            manifest = Manifest.load(p)
            files = sorted({Path(s.source) for s in manifest.shards.values()})
            missing = [str(f) for f in files if not f.exists()]
            if not files or missing:
                raise PairDataError(f"text cache {p}: source files missing or not recorded: {missing[:3]}")
            out += files
        else:
            try:
                out += [Path(f) for f in expand_shards([str(src)], RECORD_SUFFIXES, what="caption source")]
            except FileNotFoundError as e:
                raise PairDataError(str(e)) from None
    return out


def _read(path: Path, report: LoadReport) -> Iterator[dict]:
    """`l2c.data.records.read_records`, bad lines counted in `report`."""
    bad: list = []
    yield from read_records(path, bad)
    report.skipped_bad_lines += len(bad)
    report.bad_lines += [str(b) for b in bad[: max(0, 5 - len(report.bad_lines))]]


def _pick_field(rec: dict, explicit: str, candidates: tuple[str, ...]) -> str | None:
    if explicit:
        return explicit if explicit in rec else None
    return next((c for c in candidates if c in rec), None)


def load_caption_groups(
    sources: list[str | Path], key_field: str = "", captions_field: str = "", min_chars: int = 1
) -> tuple[list[CaptionGroup], LoadReport]:
    """Read captions grouped by image key; drops and counts what cannot serve as a positive pair."""
    report = LoadReport()
    by_key: dict[str, list[str]] = {}
    for path in expand_sources(sources):
        report.sources.append(str(path))
        for rec in _read(path, report):
            report.records += 1
            kf = _pick_field(rec, key_field, KEY_FIELDS)
            cf = _pick_field(rec, captions_field, CAPTION_FIELDS)
            if cf is None:
                raise PairDataError(
                    f"{path}: record has no captions field ({captions_field or ' / '.join(CAPTION_FIELDS)}); "
                    f"fields: {sorted(rec)[:10]}. Set data.captions_field."
                )
            if kf is None or rec[kf] is None:
                report.skipped_no_key += 1
                continue
            key = str(rec[kf])
            value = rec[cf]
            values = value if isinstance(value, (list, tuple)) else [value]
            if key in by_key:
                report.merged_records += 1
            bucket = by_key.setdefault(key, [])
            for c in values:
                if not isinstance(c, str):
                    report.dropped_not_text += 1
                    continue
                c = c.strip()
                if len(c) < max(min_chars, 1):
                    report.dropped_empty += 1
                elif c in bucket:
                    report.dropped_duplicate += 1
                else:
                    bucket.append(c)
    groups = []
    for key, caps in by_key.items():
        if len(caps) < 2:
            report.skipped_few_captions += 1
            continue
        groups.append(CaptionGroup(key, caps))
    report.images = len(groups)
    report.captions = sum(len(g.captions) for g in groups)
    if not groups:
        raise PairDataError(f"no image with two usable captions in {[str(s) for s in sources]}: {report.summary()}")
    return groups, report


def load_sentences(paths: list[str | Path]) -> list[str]:
    """Plain sentences for text-only positives: .txt (one a line) or .jsonl/.parquet with a `text` field."""
    out: list[str] = []
    for path in expand_sources(paths):
        if path.suffix in (".jsonl", ".parquet", ".json"):
            for rec in read_records(path):
                t = rec.get("text")
                if isinstance(t, str) and t.strip():
                    out.append(t.strip())
        else:
            out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not out:
        raise PairDataError(f"no sentences in text corpus {[str(p) for p in paths]}")
    return out


@dataclass
class PairBatch:
    """`a[i]` and `b[i]` are positives; entries with the same `group` are never each other's negatives."""

    a: list[str]
    b: list[str]
    group: list[int]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.a)

    def shard(self, rank: int, world: int) -> PairBatch:
        n = len(self) // world
        s = slice(rank * n, (rank + 1) * n)
        return PairBatch(self.a[s], self.b[s], self.group[s], self.keys[s])


def group_ids(keys: list[str], a: list[str], b: list[str]) -> list[int]:
    """Union of entries that share an image key or any caption text (identical captions of two images)."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, (k, x, y) in enumerate(zip(keys, a, b, strict=True)):
        for token in (("k", k), ("t", x), ("t", y)):
            j = first.setdefault(token, i)
            if j != i:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(keys))]


class PairSampler:
    """Global batch for any step, deterministically from (seed, step)."""

    def __init__(
        self,
        groups: list[CaptionGroup],
        batch_size: int,
        seed: int = 0,
        text_ratio: float = 0.0,
        sentences: list[str] | None = None,
    ):
        self.groups = groups
        self.batch_size = batch_size
        self.seed = seed
        self.n_text = int(round(batch_size * text_ratio))
        self.n_caption = batch_size - self.n_text
        self.sentences = sentences if sentences is not None else [c for g in groups for c in g.captions]
        if self.n_caption and len(groups) < self.n_caption:
            raise PairDataError(
                f"{len(groups)} images cannot fill {self.n_caption} caption pairs per batch (one pair per "
                "image per batch): lower train.batch_size"
            )
        if self.n_text > len(self.sentences):
            raise PairDataError(f"{len(self.sentences)} sentences cannot fill {self.n_text} text pairs a batch")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.groups) // self.n_caption if self.n_caption else max(len(self.sentences) // self.n_text, 1)

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def batch(self, step: int) -> PairBatch:
        epoch, k = divmod(step, self.steps_per_epoch)
        a: list[str] = []
        b: list[str] = []
        keys: list[str] = []
        if self.n_caption:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
            rng = np.random.default_rng([self.seed, epoch, k, 1])
            for idx in perm[k * self.n_caption : (k + 1) * self.n_caption]:
                g = self.groups[int(idx)]
                i, j = rng.choice(len(g.captions), size=2, replace=False)
                a.append(g.captions[i])
                b.append(g.captions[j])
                keys.append(g.key)
        if self.n_text:
            rng = np.random.default_rng([self.seed, step, 2])
            for idx in rng.choice(len(self.sentences), size=self.n_text, replace=False):
                s = self.sentences[int(idx)]
                a.append(s)
                b.append(s)
                keys.append(f"text:{int(idx)}")
        return PairBatch(a, b, group_ids(keys, a, b), keys)
