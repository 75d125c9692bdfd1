"""Annotation layouts `l2c make-shards --format NAME` reads, and the record selection (`--select`, `--split`).

Every format becomes the same normalized records, `{"key", "file", "captions", ...the set's own fields}`
(`file` relative to the images folder), which `make_shards` checks and writes like a generic JSONL: a record
with no key, an invalid or duplicate key, no captions or a missing or unreadable image is a counted reject.
Records outside the chosen subset (another official split, past the first N, another `--split` part, not in
`--select`) are *selected out*: neither written nor rejects, and their images are not "unreferenced".

| format | files read (the official evaluation's names) | subset (default) |
|---|---|---|
| `jsonl` | any JSONL / Parquet (today's generic reader, `--key-field`, `--image-field`, `--caption-field`) | — |
| `karpathy` | `dataset_coco.json`, `dataset_flickr30k.json` (Karpathy splits: `images[].filepath/filename`, `sentences[].raw`, `split`) | `test` |
| `retrieval-json` | a JSON list of `{"image", "caption"}`: `coco_karpathy_test.json`, `flickr30k_test.json` and the official evaluation's own `validation_1k.json`, `test.json` | all |
| `sharegpt4v` | `share-captioner_coco_lcs_sam_1246k_1107.json` (`image`, `conversations[1].value`) | first `1000` |
| `urban1k` | the `Urban1k` folder: `image/N.jpg` and `caption/N.txt` (first line) | all |
| `docci` | `docci_descriptions.jsonlines` (`example_id`, `split`, `image_file`, `description`) | `test` |
| `imagenet` | class folders (`DIR/<class>/<image>`) and a class-names file (one name a line, sorted folder order, or `<folder> <name>`) | all |
| `xm3600` | Crossmodal-3600 `captions.jsonl` (`image/key`, `<lang>.caption`), images `<image/key>.jpg` | language `en` |
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from l2c import atomic
from l2c.data.records import BadRecord, iter_records
from l2c.data.settings import IMAGE_SUFFIXES, MakeShardsConfig, MakeShardsError

# Field names of a normalized record (what `make_shards` reads when --format is not `jsonl`).
KEY, FILE, CAPTIONS = "key", "file", "captions"

Item = tuple[int, "dict | BadRecord"]  # (1-based line or position, record)


@dataclass
class Source:
    """The records one make-shards run reads, after subset and selection."""

    records: list[Item]
    digest: str  # sha256 of the inputs and the selection: part of the output's fingerprint
    scan_unreferenced: bool = True  # does the annotation name every image in the folder?
    selected_out_files: set[str] = field(default_factory=set)  # images of records selected out
    selected_out: int = 0
    select_missing: int = 0  # --select entries that named no record


def key_from_file_name(name: str) -> str:
    """The image's path without its suffix, '/', '\\', '.' and spaces replaced by '_' (a valid sample key)."""
    stem = os.path.splitext(name.strip())[0]
    return re.sub(r"[./\\\s]", "_", stem)


# ------------------------------------------------------------------------------------------ formats


def _load_json(path: Path):
    if not path.is_file():
        raise MakeShardsError(f"annotation file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MakeShardsError(f"{path} is not a JSON file: {e}") from e


def _bad(path: Path, n: int, detail: str) -> BadRecord:
    return BadRecord(str(path), n, "bad_json", detail)


def _subset_names(subset: str) -> set[str]:
    return {s.strip() for s in subset.split(",") if s.strip()}


def karpathy(images_dir: Path, ann: Path, subset: str) -> Iterator[tuple[Item, bool]]:
    """`dataset_coco.json` / `dataset_flickr30k.json`: `{"images": [{"filepath"?, "filename", "split",
    "sentences": [{"raw"}], "cocoid"?, "imgid", "sentids"}]}`; key `cocoid` (COCO) or the file-name stem."""
    data = _load_json(ann)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise MakeShardsError(f"{ann} has no 'images' list: not a Karpathy split file (dataset_coco.json, ...)")
    splits = _subset_names(subset)
    for n, img in enumerate(images, 1):
        if not isinstance(img, dict):
            yield (n, _bad(ann, n, f"images[{n - 1}] is not an object")), True
            continue
        name = img.get("filename")
        name = os.path.join(img["filepath"], name) if isinstance(name, str) and img.get("filepath") else name
        key = img.get("cocoid", key_from_file_name(name) if isinstance(name, str) and name.strip() else None)
        caps = [s.get("raw") for s in img.get("sentences") or [] if isinstance(s, dict)]
        own = {k: v for k, v in img.items() if k != "sentences"}
        rec = {**own, KEY: key, FILE: name, CAPTIONS: caps}
        yield (n, rec), ("all" in splits or img.get("split") in splits)


def retrieval_json(images_dir: Path, ann: Path, subset: str) -> Iterator[tuple[Item, bool]]:
    """A JSON list of `{"image": path under the image root, "caption": str or [str]}` (BLIP's
    `coco_karpathy_test.json`, `flickr30k_test.json`; the official evaluation's `validation_1k.json`, `test.json`)."""
    data = _load_json(ann)
    if not isinstance(data, list):
        raise MakeShardsError(f"{ann} is not a JSON list of {{'image', 'caption'}} records")
    for n, item in enumerate(data, 1):
        if not isinstance(item, dict):
            yield (n, _bad(ann, n, f"item {n - 1} is not an object")), True
            continue
        name = item.get("image")
        key = key_from_file_name(name) if isinstance(name, str) and name.strip() else None
        own = {k: v for k, v in item.items() if k != "caption"}
        yield (n, {**own, KEY: key, FILE: name, CAPTIONS: item.get("caption")}), True


def _first_n(subset: str, default: int) -> int | None:
    if subset in ("", "all"):
        return None
    try:
        n = int(subset)
    except ValueError:
        raise MakeShardsError(f"--subset for this format is a number of records or 'all', got {subset!r}") from None
    if n < 1:
        raise MakeShardsError(f"--subset must be >= 1, got {n}")
    return n


def sharegpt4v(images_dir: Path, ann: Path, subset: str) -> Iterator[tuple[Item, bool]]:
    """ShareGPT4V share-captioner json: `[{"id", "image", "conversations": [{"from": "human"}, {"from": "gpt",
    "value": caption}]}]`; the official evaluation takes the first 1,000 records and `conversations[1].value`."""
    data = _load_json(ann)
    if not isinstance(data, list):
        raise MakeShardsError(f"{ann} is not a JSON list of ShareGPT4V records")
    limit = _first_n(subset, 1000)
    for n, item in enumerate(data, 1):
        keep = limit is None or n <= limit
        if not keep:  # past the first N: counted as selected out, not read
            yield (n, None), False
            continue
        if not isinstance(item, dict):
            yield (n, _bad(ann, n, f"item {n - 1} is not an object")), keep
            continue
        name = item.get("image")
        conv = item.get("conversations")
        caption = conv[1].get("value") if isinstance(conv, list) and len(conv) > 1 and isinstance(conv[1], dict) else None
        key = key_from_file_name(name) if isinstance(name, str) and name.strip() else None
        own = {k: v for k, v in item.items() if k != "conversations"}
        yield (n, {**own, KEY: key, FILE: name, CAPTIONS: caption}), keep


def _numeric_order(stem: str):
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def urban1k(images_dir: Path, ann: Path | None, subset: str) -> Iterator[tuple[Item, bool]]:
    """The Urban1k folder (IMAGES_DIR): `image/N.jpg` and `caption/N.txt`; the caption is the file's first line
    (as the official evaluation reads it). An image without a caption file is `no_captions`, a caption file
    without its image `missing_file`."""
    cap_dir = ann if ann is not None else images_dir / "caption"
    img_dir = images_dir / "image"
    if not cap_dir.is_dir() or not img_dir.is_dir():
        raise MakeShardsError(f"{images_dir} is not an Urban1k folder: it needs image/ and caption/ "
                              "(or pass --captions CAPTION_DIR)")
    images = {p.stem: p.name for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    texts = {p.stem: p for p in cap_dir.glob("*.txt")}
    for n, stem in enumerate(sorted(images.keys() | texts.keys(), key=_numeric_order), 1):
        caption = None
        if stem in texts:
            try:
                lines = texts[stem].read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                yield (n, _bad(texts[stem], 1, f"{texts[stem].name} is not UTF-8: {e.reason}")), True
                continue
            caption = lines[0] if lines else None
        file = f"image/{images.get(stem, stem + '.jpg')}"
        yield (n, {KEY: stem, FILE: file, CAPTIONS: caption, "caption_file": f"caption/{stem}.txt"}), True


def docci(images_dir: Path, ann: Path, subset: str) -> Iterator[tuple[Item, bool]]:
    """`docci_descriptions.jsonlines`: `{"example_id", "split", "image_file", "description"}`; the official
    evaluation keeps `split == "test"`."""
    if not ann.is_file():
        raise MakeShardsError(f"annotation file {ann} does not exist")
    splits = _subset_names(subset)
    for n, rec in iter_records(ann):
        if isinstance(rec, BadRecord):
            yield (n, rec), True
            continue
        name = rec.get("image_file")
        key = rec.get("example_id") or (key_from_file_name(name) if isinstance(name, str) and name.strip() else None)
        own = {k: v for k, v in rec.items() if k != "description"}
        yield (n, {**own, KEY: key, FILE: name, CAPTIONS: rec.get("description")}), (
            "all" in splits or rec.get("split") in splits)


def imagenet(images_dir: Path, ann: Path, subset: str) -> Iterator[tuple[Item, bool]]:
    """Class folders `IMAGES_DIR/<class>/<image>` (torchvision `ImageFolder`: label = index of the folder in
    sorted order) and a class-names file: one name a line in that order, or `<folder> <name>` lines (e.g.
    `LOC_synset_mapping.txt`). Caption: the class name; extra fields `label` (index), `class_name`, `folder`."""
    if not ann.is_file():
        raise MakeShardsError(f"class-names file {ann} does not exist")
    folders = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise MakeShardsError(f"{images_dir} has no class folders")
    lines = [ln.strip() for ln in ann.read_text(encoding="utf-8").splitlines() if ln.strip()]
    first = [ln.split(None, 1) for ln in lines]
    if lines and all(len(p) == 2 and p[0] in folders for p in first):
        names = {p[0]: p[1].strip() for p in first}
        missing = [f for f in folders if f not in names]
        if missing:
            raise MakeShardsError(f"{ann} names no class for folder(s) {missing[:5]}")
    elif len(lines) == len(folders):
        names = dict(zip(folders, lines, strict=True))
    else:
        raise MakeShardsError(f"{ann} has {len(lines)} class names but {images_dir} has {len(folders)} class "
                              "folders: give one name per folder (sorted folder order) or '<folder> <name>' lines")
    n = 0
    for label, folder in enumerate(folders):
        for p in sorted((images_dir / folder).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                n += 1
                rel = p.relative_to(images_dir).as_posix()
                rec = {KEY: key_from_file_name(rel), FILE: rel, CAPTIONS: [names[folder]], "label": label,
                       "class_name": names[folder], "folder": folder}
                yield (n, rec), True


def xm3600(images_dir: Path, ann: Path, subset: str) -> Iterator[tuple[Item, bool]]:
    """Crossmodal-3600 `captions.jsonl`: `{"image/key", "image/locale", "<lang>": {"caption": [...], ...}}` for
    36 languages; images `IMAGES_DIR/<image/key>.jpg`. `--subset` is the language (default `en`)."""
    if not ann.is_file():
        raise MakeShardsError(f"annotation file {ann} does not exist")
    lang = subset or "en"
    for n, rec in iter_records(ann):
        if isinstance(rec, BadRecord):
            yield (n, rec), True
            continue
        key = rec.get("image/key")
        per_lang = rec.get(lang)
        caps = per_lang.get("caption") if isinstance(per_lang, dict) else None
        out = {KEY: key, FILE: f"{key}.jpg" if isinstance(key, str) and key.strip() else None, CAPTIONS: caps,
               "image/key": key, "image/locale": rec.get("image/locale"), "language": lang}
        yield (n, out), True


FORMATS: dict[str, tuple[Callable, str, bool, bool]] = {
    # name: (reader, default subset, annotation names every image in the folder, --captions required)
    "karpathy": (karpathy, "test", True, True),
    "retrieval-json": (retrieval_json, "all", False, True),
    "sharegpt4v": (sharegpt4v, "1000", False, True),
    "urban1k": (urban1k, "all", True, False),
    "docci": (docci, "test", True, True),
    "imagenet": (imagenet, "all", True, True),
    "xm3600": (xm3600, "en", True, True),
}
FORMAT_NAMES = ("jsonl", *FORMATS)


# ---------------------------------------------------------------------------------------- selection


def parse_splits(specs: Iterable[str]) -> list[tuple[str, float]]:
    """`["train=0.9", "val=0.1"]` → [("train", 0.9), ("val", 0.1)]; fractions in (0, 1], summing to at most 1."""
    out: list[tuple[str, float]] = []
    for spec in specs:
        for part in spec.split(","):
            name, sep, frac = part.partition("=")
            name = name.strip()
            try:
                value = float(frac)
            except ValueError:
                value = -1.0
            if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not 0 < value <= 1:
                raise MakeShardsError(f"--split takes NAME=FRACTION with 0 < FRACTION <= 1, got {part!r}")
            if name in dict(out):
                raise MakeShardsError(f"--split names {name!r} twice")
            out.append((name, value))
    if sum(f for _, f in out) > 1 + 1e-9:
        raise MakeShardsError(f"--split fractions sum to {sum(f for _, f in out):g} > 1")
    return out


def split_of(key: str, splits: list[tuple[str, float]]) -> str | None:
    """The part a key falls in: a hash of the key, so the same key always lands in the same part."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:15], 16) / 16**15
    acc = 0.0
    for name, frac in splits:
        acc += frac
        if u < acc:
            return name
    return None


def read_select(path: Path) -> set[str]:
    """A --select file: one key or image file name a line (blank lines and `#` comments ignored)."""
    if not path.is_file():
        raise MakeShardsError(f"--select file {path} does not exist")
    return {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")}


def _key_of(rec: dict, cfg: MakeShardsConfig) -> str | None:
    """The key `make_shards` will give this record (selection must agree with it)."""
    generic = cfg.format == "jsonl"
    if cfg.key_from_file_name:
        name = rec.get(cfg.image_field if generic else FILE)
        return key_from_file_name(name) if isinstance(name, str) and name.strip() else None
    value = rec.get(cfg.key_field if generic else KEY)
    return None if value is None or str(value).strip() == "" else str(value).strip()


# ------------------------------------------------------------------------------------------- driver


def load_source(images_dir: Path, captions: Path | None, cfg: MakeShardsConfig) -> Source:
    """The records of one run: the format's reader, its subset, then `--select` and `--split`."""
    fmt = cfg.format
    h = hashlib.sha256()
    if fmt == "jsonl":
        if captions is None or not captions.is_file():
            raise MakeShardsError(f"captions file {captions} does not exist")
        h.update(atomic.sha256_file(captions).encode())
        items: Iterable[tuple[Item, bool]] = ((item, True) for item in iter_records(captions))
        scan = True
    elif fmt in FORMATS:
        reader, default_subset, scan, needs_ann = FORMATS[fmt]
        if needs_ann and captions is None:
            raise MakeShardsError(f"--format {fmt} needs --captions (the annotation file)")
        items = list(reader(images_dir, captions, cfg.subset or default_subset))
        if captions is not None and captions.is_file():
            h.update(atomic.sha256_file(captions).encode())
        if fmt in ("urban1k", "imagenet"):  # records come from the folder's listing and text files
            h.update(json.dumps([[n, rec if isinstance(rec, dict) else str(rec), keep] for (n, rec), keep in items],
                                sort_keys=True, default=str).encode())
    else:
        raise MakeShardsError(f"unknown --format {fmt!r}; one of {', '.join(FORMAT_NAMES)}")
    select = read_select(Path(cfg.select)) if cfg.select else None
    if select is not None:
        h.update(json.dumps(sorted(select)).encode())
    splits = parse_splits([cfg.split]) if cfg.split else None
    if splits is not None and cfg.split_name not in dict(splits):
        raise MakeShardsError(f"split {cfg.split_name!r} is not one of {[n for n, _ in splits]}")

    image_field = FILE if fmt != "jsonl" else cfg.image_field
    src = Source(records=[], digest="", scan_unreferenced=scan)
    matched: set[str] = set()
    for (n, rec), keep in items:
        if keep and isinstance(rec, dict) and (select is not None or splits is not None):
            key = _key_of(rec, cfg)
            name = rec.get(image_field)
            name = name.strip() if isinstance(name, str) else None
            if select is not None:
                hits = {k for k in (key, name) if k is not None and k in select}
                matched |= hits
                keep = bool(hits)
            if keep and splits is not None:
                keep = split_of(key if key is not None else f"line:{n}", splits) == cfg.split_name
        elif keep and splits is not None and not isinstance(rec, dict):  # a bad line goes to one part only
            keep = split_of(f"line:{n}", splits) == cfg.split_name
        elif keep and select is not None and not isinstance(rec, dict):
            keep = False  # a bad line names nothing to select
        if keep:
            src.records.append((n, rec))
            continue
        src.selected_out += 1
        if isinstance(rec, dict):
            name = rec.get(image_field)
            if isinstance(name, str) and name.strip():
                src.selected_out_files.add(name.strip())
    if select is not None:
        src.select_missing = len(select - matched)
    # a plain JSONL run keeps the fingerprint it always had: the captions file's sha256
    src.digest = atomic.sha256_file(captions) if fmt == "jsonl" and select is None else h.hexdigest()
    return src
