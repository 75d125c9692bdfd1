"""Where a command may write: the one rule every `--out` follows, checked before any work.

`--out` may be a new path, an empty folder, or a folder the same command wrote before: one holding its
marker, `.l2c-output.json` (the command and what it wrote), or, for commands that write their files in place
and remove nothing else, one holding only names that command writes (outputs made before the marker existed).
It is never a file, never the current directory or a folder above it, and never a run directory or a cache
or a folder inside one; those are recognised by their own files (`config.yaml` with `checkpoints/`,
`metrics.jsonl`, ... of a run; `manifest.json` of a cache). A refusal is one line naming the path and what
it holds, exit 2. The embed commands take a cache folder as `--out` (that is how they resume).
"""

from __future__ import annotations

import json
import os
import time
from fnmatch import fnmatch
from pathlib import Path

from l2c.errors import L2CError

MARKER = ".l2c-output.json"
# a run directory: its config plus any of what a trainer writes beside it
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "export", "adapters", "data_skips.json")
CACHE_FILES = ("manifest.json", "manifest.d")
# what a cache folder holds (an embed job killed before its manifest was written leaves a part of these)
CACHE_NAMES = ("manifest.json", "manifest.d", "rejected", "rejected.jsonl", "*.parquet", ".l2c-lock.json",
               ".tmp-*", "keys_checked.json")  # fmt: skip


class OutputRefused(L2CError):
    """An `--out` that would put a file, a run, a cache or the user's own files at risk."""


def what_is(path: Path) -> str | None:
    """What a folder is, told by its own files: 'a run directory (config.yaml, checkpoints/)', 'a text cache
    (manifest.json)', ...; None for anything else."""
    try:
        if not path.is_dir():
            return None
        found = [n for n in RUN_FILES if (path / n).exists()]
        if (path / "config.yaml").is_file() and found:
            shown = ", ".join(f"{n}/" if (path / n).is_dir() else n for n in found[:2])
            return f"a run directory (config.yaml, {shown})"
        if any((path / n).exists() for n in CACHE_FILES):
            try:
                fmt = json.loads((path / "manifest.json").read_text()).get("format", "")
            except (OSError, ValueError, AttributeError):
                fmt = ""
            kind = {"l2c-text-cache": "a text cache", "l2c-image-cache": "an image cache"}.get(fmt, "a cache")
            return f"{kind} (manifest.json)"
    except OSError:
        return None
    return None


def run_of(path: Path) -> str | None:
    """The trainer that wrote a run directory, told by its checkpoints' names (trainer/checkpoint.py: `step-`
    for train-vision, `mntp-` / `contrastive-` for finetune-text); None when it holds none."""
    try:
        names = os.listdir(path / "checkpoints")
    except OSError:
        return None
    if any(n.startswith(("mntp-", "contrastive-")) for n in names):
        return "finetune-text"
    return "train-vision" if any(n.startswith("step-") for n in names) else None


def is_cache(path: Path) -> bool:
    return (what_is(path) or "").endswith("(manifest.json)")


def _marker(path: Path) -> dict | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check(out: str | Path, command: str, owns: tuple[str, ...] = (), cache_ok: bool = False,
          option: str = "--out", run_ok: bool = False) -> Path:  # fmt: skip
    """The absolute `--out` of `command` if it may write there (see the module's rule), else `OutputRefused`.

    `owns`: name patterns of what the command writes in place, so a folder holding only those is its own;
    `cache_ok`: a cache folder is the command's own (the embed commands); `run_ok`: a run directory is (a
    trainer resumes it); `option`: how messages name it."""
    given = f"{option} {out}" if option else str(out)
    p = Path(out).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise OutputRefused(f"{given} is a file ({p.stat().st_size:,} bytes): {command} writes a folder; "
                            "choose a new folder")  # fmt: skip
    cwd = Path.cwd().resolve()
    if p == cwd or p in cwd.parents:
        where = "the current directory" if p == cwd else f"a folder above the current directory ({cwd})"
        raise OutputRefused(f"{given} is {where}: {command} writes a folder of its own; choose a new folder")
    for place in (p, *p.parents):
        kind = what_is(place)
        if kind is None or (place == p and cache_ok and is_cache(p)):
            continue
        if place == p and run_ok and kind.startswith("a run directory") and run_of(p) in (None, command):
            return p  # the trainer's own earlier run: it resumes (and writes only its own names there)
        where = f"is {kind}" if place == p else f"is inside {kind} at {place}"
        raise OutputRefused(f"{given} {where}: {command} never writes over or into it; choose a new folder")
    if p.is_dir():
        _check_entries(given, sorted(os.listdir(p)), _marker(p), command, owns, cache_ok)
    return p


def check_store(store, command: str, given: str | None = None) -> None:
    """`check` for an embed command's cache location (`l2c.storage.Store`; `given`: as the user wrote it): a
    folder, or an object-store prefix, which may hold a cache (it resumes) but not other files."""
    if store.local:
        check(given if given and not str(given).startswith("file://") else store.root, command, cache_ok=True)
        return
    fs = store.fs
    if fs.isfile(store.path()):
        raise OutputRefused(f"--out {store.display()} is a file: {command} writes a folder; choose a new prefix")
    try:
        names = sorted(str(n).rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(store.path(), detail=False))
    except FileNotFoundError:
        return
    if "manifest.json" not in names:
        _check_entries(f"--out {store.display()}", names, None, command, (), True)


def _check_entries(given: str, entries: list[str], mark: dict | None, command: str, owns: tuple[str, ...],
                   cache_ok: bool) -> None:  # fmt: skip
    """An existing folder's entries: empty, marked by this command, or holding only what it writes."""
    if not entries or (mark is not None and mark.get("command") == command):
        return
    if cache_ok and all(any(fnmatch(n, pat) for pat in CACHE_NAMES) for n in entries):
        return
    if mark is None and owns and all(any(fnmatch(n, pat) for pat in (*owns, ".tmp-*")) for n in entries):
        return
    if mark is not None:
        raise OutputRefused(f"{given} holds the output of l2c {mark.get('command')}: {command} writes "
                            "only a new or empty folder or its own earlier output; choose a new folder")  # fmt: skip
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise OutputRefused(f"{given} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                        f"{command} did not write ({shown}): it writes only a new or empty folder or its own "
                        "earlier output; choose a new folder")  # fmt: skip


def mark(directory: str | Path, command: str, kind: str = "") -> None:
    """Write the marker that makes `directory` this command's own output (a rerun may write there again):
    into the temp folder before it is published, or once the command has written its files."""
    from l2c import __version__, atomic

    atomic.write_json(Path(directory) / MARKER, {"command": command, "kind": kind, "l2c_version": __version__,
                                                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
