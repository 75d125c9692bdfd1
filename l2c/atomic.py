"""Atomic file writes and content hashes: nothing half-written ever carries a final name.

Every published file and folder gets the mode the umask gives (0644 / 0755 under umask 022), whatever wrote
it: `mkstemp` and some writers (safetensors, `save_pretrained`) make files private (0600), which others
sharing the storage could not read. An interrupted write (an error, Ctrl-C, SIGTERM) leaves no temp behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the process umask (0o644 under umask 022), as `open()` would give it."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new folder gets under the process umask (0o755 under umask 022)."""
    return 0o777 & ~_umask()


def umask_modes(root: str | Path) -> None:
    """Give `root` and everything below it the umask's modes (files keep an executable bit they had)."""
    files, dirs = file_mode(), dir_mode()
    for base, _dirs, names in os.walk(root):
        os.chmod(base, dirs)
        for name in names:
            p = os.path.join(base, name)
            if not os.path.islink(p):
                os.chmod(p, dirs if os.stat(p).st_mode & 0o100 else files)


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
def naming(path: str | Path):
    """An OS error raised inside that names no file (a failed `write()` does not) names `path`, so the one
    line the CLI prints says where (`/data/shard.parquet: File too large (EFBIG)`)."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:  # an OSError("message") keeps its message
            e.filename = str(path)
        raise


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path to write; on success fsync and rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        with naming(path):
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())  # a writer that made the file anew may have made it private
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
    directory or the new one, never a half-written one. Its files get the umask's modes first."""
    tmp, final = Path(tmp), Path(final)
    umask_modes(tmp)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def atomic_dir(final: str | Path):
    """Yield an empty temp directory to fill; on success publish it as `final` (`replace_dir`), on any error
    or interruption remove it."""
    tmp = tmp_dir_for(final)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_tmp(directory: str | Path) -> int:
    """Delete temp files (and temp folders) a crashed or interrupted run left behind; returns how many."""
    n = 0
    for p in Path(directory).glob(".tmp-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
