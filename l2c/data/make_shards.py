"""Convert a folder of images plus a captions JSONL into webdataset shards.

Each JSONL record (e.g. `{"image_id": 139, "file": "000000000139.jpg", "captions": [...]}`) becomes a sample:

    __key__   the record's id (`--key-field`)
    jpg/png   the image bytes as they are on disk (re-encoded to JPEG only with `--max-side` or an odd format)
    txt       the first caption
    json      the original record, plus `captions` (cleaned list), `long_caption` (all captions joined, unless
              the record brings its own), `width` and `height` of the stored image

Nothing is dropped silently: records with a missing or unreadable image or one over PIL's decompression bomb
limit (`image_too_large`), no captions, a missing, invalid or duplicate id, malformed JSON lines, and image
files that no record names are counted, listed with the reason in `OUT/rejected.jsonl` and shown in the
summary; `strict=True` turns the first of them into an error.

Shards are written atomically; after each one a small `OUT/.parts/shard-NNNNNN.json` records its keys, the
rejections before it and where to resume, so an interrupted run continues after its last finished shard.
`OUT/info.json` is written last and marks the output complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image

from l2c import atomic
from l2c.data import importers
from l2c.data.images import ORIENTATION, TOO_LARGE, ImageTooLarge, open_image, to_rgb
from l2c.data.records import BadRecord, iter_records
from l2c.data.settings import IMAGE_SUFFIXES, MakeShardsConfig, MakeShardsError
from l2c.data.writer import AtomicShardWriter, encode_sample, list_shards, shard_name
from l2c.progress import ProgressBar

FORMAT_NAME = "l2c-shards"
FORMAT_VERSION = 1
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # copied as-is; anything else is re-encoded
REASONS = (
    "bad_json", "missing_key", "invalid_key", "duplicate_id", "no_captions", "missing_image_field",
    "missing_file", "unreadable_image", TOO_LARGE, "unreferenced_image",
)
PARTS = ".parts"
OUTPUT_NAMES = ("shard-*.tar", "info.json", "rejected.jsonl", PARTS)  # all that make-shards writes in OUT


_OPTIONAL_SETTINGS = {"format": "jsonl", "subset": None, "key_from_file_name": False, "select": None,
                      "split": None, "split_name": None}  # left out of the fingerprint when at these values


@dataclass
class Record:
    line: int  # 1-based line in the captions file
    key: str
    path: Path
    captions: list[str]
    raw: dict


# ----------------------------------------------------------------------------------------- records


def _reject(reason: str, line: int | None, detail: str, **extra) -> dict:
    return {"reason": reason, "line": line, "detail": detail, **extra}


def clean_captions(value) -> list[str]:
    """A caption field (string or list) as a list of non-empty stripped strings."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]


def join_captions(captions: list[str]) -> str:
    """All captions as one paragraph, each ending with a full stop."""
    return " ".join(c if c[-1] in ".!?" else c + "." for c in captions)


def read_records(images_dir: Path, captions_file: Path | None, cfg: MakeShardsConfig,
                 source=None) -> tuple[list[Record], list[dict]]:
    """Parse and check every record (no image decoding yet); returns (accepted records, rejections).

    `source`: (line, record) pairs already read (`l2c.data.importers.load_source`) instead of `captions_file`."""
    records: list[Record] = []
    rejected: list[dict] = []
    seen: dict[str, int] = {}
    for line_no, raw in (source if source is not None else iter_records(captions_file)):
        if isinstance(raw, BadRecord):  # not JSON, not UTF-8, or not an object
            rejected.append(_reject("bad_json", line_no, raw.detail))
            continue
        name = raw.get(cfg.image_field)
        name = name.strip() if isinstance(name, str) and name.strip() else None
        ref = {"file": name} if name else {}  # a rejected record's image is accounted for by the record
        value = raw.get(cfg.key_field)
        if cfg.key_from_file_name:
            value = importers.key_from_file_name(name) if name else None
        if value is None or str(value).strip() == "":
            what = f"no {cfg.image_field!r} to take the key from" if cfg.key_from_file_name else f"no {cfg.key_field!r} field"
            rejected.append(_reject("missing_key", line_no, what, **ref))
            continue
        key = str(value).strip()
        if any(ch in key for ch in "./\\") or any(ch.isspace() for ch in key):
            rejected.append(_reject("invalid_key", line_no, f"id {key!r} contains '.', '/', '\\' or spaces, "
                                    "which webdataset member names cannot carry", key=key, **ref))
            continue
        if key in seen:
            rejected.append(_reject("duplicate_id", line_no, f"id {key!r} already used on line {seen[key]}",
                                    key=key, **ref))
            continue
        seen[key] = line_no
        captions = clean_captions(raw.get(cfg.caption_field))
        if not captions:
            rejected.append(_reject("no_captions", line_no, f"no non-empty {cfg.caption_field!r}", key=key, **ref))
            continue
        if name is None:
            rejected.append(_reject("missing_image_field", line_no, f"no {cfg.image_field!r} field", key=key))
            continue
        path = images_dir / name
        if not path.is_file():
            rejected.append(_reject("missing_file", line_no, f"{path} does not exist", key=key, **ref))
            continue
        records.append(Record(line_no, key, path, captions, raw))
    return records, rejected


def unreferenced_images(images_dir: Path, records: list[Record], rejected: list[dict],
                        selected_out: set[str] = frozenset()) -> list[dict]:
    """Image files in the folder that no record names (they would otherwise be lost without a word);
    `selected_out`: names of images whose records the subset or selection left out (not unreferenced)."""
    def norm(p: Path) -> str:
        return os.path.normpath(p.absolute())  # symlinks count as the names they are listed under

    named = {norm(r.path) for r in records} | {norm(images_dir / r["file"]) for r in rejected if r.get("file")}
    named |= {norm(images_dir / f) for f in selected_out}
    out = []
    for p in sorted(images_dir.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and norm(p) not in named:
            out.append(_reject("unreferenced_image", None, "no captions record names this file",
                               file=str(p.relative_to(images_dir))))
    return out


# ------------------------------------------------------------------------------------------ images


def load_image(path: Path, max_side: int | None, jpeg_quality: int) -> tuple[bytes, str, int, int]:
    """(bytes, member extension, width, height as shown); the file's own bytes unless it must be re-encoded
    (then as `l2c.data.images.to_rgb` shows it: EXIF orientation, 16-bit, transparency). An image over the
    decompression bomb limit raises `ImageTooLarge` before it is decoded."""
    data = path.read_bytes()
    with open_image(data) as img:
        img.load()  # full decode: truncated or corrupt files fail here, not in the trainer
        fmt, (w, h) = img.format, img.size
        if img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # shown rotated by a quarter turn
            w, h = h, w
        too_big = max_side is not None and max(w, h) > max_side
        if fmt in KEEP_FORMATS and not too_big:
            return data, KEEP_FORMATS[fmt], w, h
        img = to_rgb(img)
        if too_big:
            scale = max_side / max(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
        return buf.getvalue(), "jpg", img.width, img.height


def _load(record: Record, cfg: MakeShardsConfig):
    try:
        return load_image(record.path, cfg.max_side, cfg.jpeg_quality), None
    except ImageTooLarge as e:
        return None, str(e)
    except Exception as e:  # PIL raises many types for broken files
        return None, f"{type(e).__name__}: {e}"


def _ordered_map(fn, items, workers: int):
    """`map` over a thread pool with a bounded look-ahead (memory stays flat on big folders)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def make_sample(record: Record, image: tuple[bytes, str, int, int]) -> dict:
    data, ext, w, h = image
    meta = {**record.raw, "captions": record.captions, "width": w, "height": h}
    if not (isinstance(meta.get("long_caption"), str) and meta["long_caption"].strip()):
        meta["long_caption"] = join_captions(record.captions)
    return encode_sample(record.key, data, ext, record.captions[0], meta)


# ----------------------------------------------------------------------------------- resume state


def fingerprint(images_dir: Path, captions_file: Path | None, cfg: MakeShardsConfig, digest: str | None = None) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("strict", "workers")
                and not (k in _OPTIONAL_SETTINGS and v == _OPTIONAL_SETTINGS[k])}
    h = hashlib.sha256((digest or atomic.sha256_file(captions_file)).encode())
    h.update(json.dumps({"images_dir": str(images_dir.resolve()), **settings}, sort_keys=True).encode())
    return h.hexdigest()


def _load_parts(out: Path, fp: str) -> list[dict]:
    """Sidecars of consecutive finished shards made with the same fingerprint."""
    parts = []
    while True:
        shard = out / shard_name(len(parts))
        sidecar = out / PARTS / f"{shard.stem}.json"
        if not (shard.exists() and sidecar.exists()):
            return parts
        part = json.loads(sidecar.read_text())
        if part.get("fingerprint") != fp:
            return parts
        parts.append(part)


def _clear(out: Path, keep_shards: int = 0) -> None:
    """Remove the completion marker, shards and sidecars from index `keep_shards` on, and temp files."""
    for name in ("info.json", "rejected.jsonl"):
        (out / name).unlink(missing_ok=True)
    for p in list_shards(out):
        if int(p.stem.split("-")[1]) >= keep_shards:
            p.unlink()
    if (out / PARTS).exists():
        for p in (out / PARTS).glob("shard-*.json"):
            if int(p.stem.split("-")[1]) >= keep_shards:
                p.unlink()
        atomic.remove_stale_tmp(out / PARTS)
    atomic.remove_stale_tmp(out)


# ------------------------------------------------------------------------------------------- driver


def make_shards(
    images_dir: str | Path,
    captions_file: str | Path,
    out: str | Path,
    cfg: MakeShardsConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Write shards to `out` and return the summary (also written to `out/info.json`)."""
    cfg = cfg or MakeShardsConfig()
    images_dir, out = Path(images_dir), Path(out)
    captions_file = Path(captions_file) if captions_file is not None else None
    if cfg.shard_size < 1:
        raise MakeShardsError(f"shard_size must be >= 1, got {cfg.shard_size}")
    if cfg.max_side is not None and cfg.max_side < 8:
        raise MakeShardsError(f"max_side must be >= 8, got {cfg.max_side}")
    if not images_dir.is_dir():
        raise MakeShardsError(f"images directory {images_dir} does not exist")
    if cfg.format == "jsonl" and (captions_file is None or not captions_file.is_file()):
        raise MakeShardsError(f"captions file {captions_file} does not exist")

    source = importers.load_source(images_dir, captions_file, cfg)
    if cfg.format != "jsonl":  # importers' normalized fields
        cfg = replace(cfg, key_field=importers.KEY, image_field=importers.FILE, caption_field=importers.CAPTIONS)

    fp = fingerprint(images_dir, captions_file, cfg, digest=source.digest)
    info_path = out / "info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fp and all((out / s).exists() for s in info["shards"]):
            return {**info, "skipped": True}
        if info.get("fingerprint") != fp and not overwrite:
            raise MakeShardsError(f"{out} holds shards made from other inputs or settings ({info_path}); "
                                  "pass --overwrite to replace them, or choose another output directory")
    elif list_shards(out) and not _load_parts(out, fp) and not overwrite:
        raise MakeShardsError(f"{out} holds shards this run cannot resume; pass --overwrite to replace them")

    t0 = time.perf_counter()
    records, rejected = read_records(images_dir, captions_file, cfg, source=source.records)
    n_records = len(records) + len(rejected)  # every non-empty line of the captions file
    if source.scan_unreferenced:
        rejected += unreferenced_images(images_dir, records, rejected, source.selected_out_files)
    if cfg.strict and rejected:
        r = rejected[0]
        raise MakeShardsError(f"{len(rejected)} input problem(s) before reading images; first: {r['reason']} "
                              f"(line {r['line']}): {r['detail']}")

    parts = _load_parts(out, fp) if not overwrite else []
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, keep_shards=len(parts))
    start = parts[-1]["next_record"] if parts else 0
    image_rejects: list[dict] = [r for p in parts for r in p["image_rejects"]]
    pending_rejects: list[dict] = []
    position = {"next": start}

    def on_shard(path: Path, keys: list[str]) -> None:
        part = {"fingerprint": fp, "shard": path.name, "keys": keys, "next_record": position["next"],
                "image_rejects": list(pending_rejects)}
        atomic.write_json(out / PARTS / f"{path.stem}.json", part)
        pending_rejects.clear()

    todo = records[start:]
    stored_bytes = 0
    with atomic.naming(out), ProgressBar("images", enabled=show_progress) as progress, \
            AtomicShardWriter(out, cfg.shard_size, start_shard=len(parts), on_shard=on_shard) as writer:
        progress.add("make-shards", total=len(records), completed=start)
        results = _ordered_map(lambda r: _load(r, cfg), todo, cfg.workers)
        for i, (record, (image, error)) in enumerate(zip(todo, results, strict=True), start):
            position["next"] = i + 1
            if error is not None:
                reason = TOO_LARGE if error.startswith(TOO_LARGE) else "unreadable_image"
                bad = _reject(reason, record.line, error, key=record.key, file=str(record.raw[cfg.image_field]))
                if cfg.strict:
                    raise MakeShardsError(f"unreadable image {record.path} (line {record.line}): {error}")
                pending_rejects.append(bad)
                image_rejects.append(bad)
            else:
                sample = make_sample(record, image)
                stored_bytes += len(sample[image[1]])
                writer.write(sample)
            progress.advance()
    seconds = time.perf_counter() - t0

    rejected += image_rejects
    rejected.sort(key=lambda r: (r["line"] is None, r["line"] or 0, r.get("file", "")))
    shards = list_shards(out)
    written = sum(len(json.loads((out / PARTS / f"{p.stem}.json").read_text())["keys"]) for p in shards)
    counts = Counter(r["reason"] for r in rejected)
    atomic.write_text(out / "rejected.jsonl", "".join(json.dumps(r) + "\n" for r in rejected))
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "fingerprint": fp,
        "images_dir": str(images_dir.resolve()),
        "captions": str(captions_file.resolve()) if captions_file is not None else None,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "workers"},
        "records": n_records,
        "written": written,
        "rejected": sum(counts.values()),
        "rejected_by_reason": {k: counts[k] for k in REASONS if counts[k]},
        "selected_out": source.selected_out,  # records outside --subset / --select / --split: not rejects
        "select_missing": source.select_missing,
        "shards": [p.name for p in shards],
        "resumed_from_shard": len(parts),
        "bytes": sum(p.stat().st_size for p in shards),
        "image_bytes_this_run": stored_bytes,
        "seconds": round(seconds, 2),
        "images_per_second": round((len(records) - start) / max(seconds, 1e-9), 1),
    }
    atomic.write_json(info_path, info)  # last: marks the output complete
    return info


def print_summary(info: dict, out: str | Path, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="make-shards" + (" (already complete, skipped)" if info.get("skipped") else ""))
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    table.add_row("records", str(info["records"]))
    table.add_row("written", str(info["written"]), style="green")
    for reason, n in info["rejected_by_reason"].items():
        table.add_row(f"rejected: {reason}", str(n), style="yellow")
    table.add_row("shards", str(len(info["shards"])))
    table.add_row("MB", f"{info['bytes'] / 1e6:.1f}")
    table.add_row("images/s", f"{info['images_per_second']:,.0f}")
    console.print(table)
    console.print(f"shards in {out}", soft_wrap=True)
    if info["rejected"]:
        console.print(f"[yellow]{info['rejected']} rejected; each with its reason in {Path(out) / 'rejected.jsonl'}",
                      soft_wrap=True)
