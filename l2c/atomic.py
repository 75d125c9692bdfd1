"""Atomic file writes and content hashes: nothing half-written ever carries a final name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def file_mode() -> int:
    """The mode a new file gets under the process umask (0o644 under umask 022), as `open()` would give it."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def tmp_path_for(path: str | Path) -> Path:
    """A temp name beside `path` (same filesystem, so the rename is atomic), recognisable by `.tmp-`.

    mkstemp makes the file private (0600); it gets the umask's mode, so the published file is readable by
    whoever may read the directory (shared storage).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.fchmod(fd, file_mode())
    os.close(fd)
    return Path(name)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path to write; on success fsync and rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tmp_dir_for(final: str | Path) -> Path:
    """An empty temp directory beside `final` (`.tmp-NAME`, what a crashed writer left there removed)."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Publish a finished temp directory under its final name, replacing an older one: readers see the old
    directory or the new one, never a half-written one."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_tmp(directory: str | Path) -> int:
    """Delete temp files a crashed run left behind; returns how many."""
    n = 0
    for p in Path(directory).glob(".tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
