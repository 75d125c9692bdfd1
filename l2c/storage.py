"""Where a cache lives: a local path, a `file://` URL, or an object-store URL (`s3://`, `gs://`, any fsspec protocol).

Writes never leave a half-written file under a final name:
- on a filesystem, a file is written under a `.tmp-` name beside its target, fsynced and renamed;
- on an object store, it is written to a local temp file and uploaded in one PUT (or one multipart upload);
  the store makes the object visible only when the upload completes, and an aborted upload leaves nothing.

>>> store = Store("s3://bucket/caches/minilm")     # or "cache/", "file:///fsx/cache"
>>> store.write_bytes("manifest.json", b"{}")
>>> sha = store.write_file("shard-000.parquet", lambda tmp: table_to_parquet(tmp))
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from l2c import atomic
from l2c.errors import L2CError

# fsspec packages a protocol needs, for the error message when one is missing.
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class StorageError(L2CError, ValueError):
    """A location that cannot be opened (unknown protocol, missing fsspec package, bad URL)."""


def is_url(spec: str | Path) -> bool:
    """True for `proto://...` (also as a `Path`, which folds `//` into `/`); plain paths, `file:` URLs and
    `pipe:` commands are not. A one-letter scheme is a Windows drive (`C:/data`)."""
    s = str(spec)
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", s) is not None and not s.startswith("file:")


def normalize(spec: str | Path) -> str:
    """A location as a string: `file:` URLs become local paths; `s3:/b/k` (a URL that went through `Path`) is mended."""
    s = str(spec)
    if s.startswith("file:"):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem._strip_protocol(s)
    if is_url(s):
        proto, rest = s.split(":", 1)
        return f"{proto}://{rest.lstrip('/')}"
    return s


def glob_urls(pattern: str) -> list[str]:
    """The files matching a glob, sorted: local paths for a local pattern, full URLs for an object-store one."""
    import fsspec

    fs, _, hits = fsspec.get_fs_token_paths(pattern)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [h if proto in ("file", "local") else f"{proto}://{h}" for h in sorted(hits)]


def open_store(spec: str | Path) -> Store:
    """A `Store` whose filesystem is opened now, so a bad URL or a missing fsspec package fails here."""
    store = as_store(spec)
    _ = store.fs
    return store


class Store:
    """A directory-like location; paths given to its methods are relative to it (`"rejected/shard-000.jsonl"`)."""

    def __init__(self, spec: str | Path):
        s = normalize(spec)
        self.local = not is_url(s)
        if self.local:
            self.root = str(Path(s).expanduser().resolve())
            self.url = self.root
        else:
            self.url = s.rstrip("/")
            self.root = ""
        self._fs = None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}

    @property
    def fs(self):
        """The fsspec filesystem (created on first use, so a Store pickles to Ray workers as its URL)."""
        if self._fs is None:
            import fsspec

            if self.local:
                from fsspec.implementations.local import LocalFileSystem

                self._fs = LocalFileSystem()
            else:
                proto = self.url.split("://", 1)[0]
                try:
                    self._fs, self.root = fsspec.core.url_to_fs(self.url)
                except ImportError as e:
                    pkg = PROTOCOL_PACKAGES.get(proto, f"the fsspec implementation of {proto}://")
                    raise StorageError(f"{self.url}: reading and writing {proto}:// needs {pkg} (pip install {pkg})") from e
                except ValueError as e:
                    raise StorageError(f"{self.url}: {e}") from e
                self.root = self.root.rstrip("/")
        return self._fs

    def path(self, rel: str = "") -> str:
        """The full path of `rel` inside the store, as its filesystem names it."""
        _ = self.fs  # resolves `root` for URLs
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        """`rel` as a user would type it (the URL for object stores)."""
        return f"{self.url}/{rel}" if rel else self.url

    # ------------------------------------------------------------------ reading
    def _fresh(self, path: str) -> str:
        """`path`, with the filesystem's listing cache for it dropped: other processes (Ray workers) write here."""
        if not self.local:
            self.fs.invalidate_cache(path)
        return path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fresh(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def list(self, subdir: str = "", suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly in `subdir` ending with `suffix`, sorted; [] if none."""
        try:
            entries = self.fs.ls(self._fresh(self.path(subdir)), detail=True)
        except FileNotFoundError:
            return []
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith(".tmp-"))

    def sha256(self, rel: str, chunk: int = 1 << 22) -> str:
        h = hashlib.sha256()
        with self.open(rel) as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()

    def fetch(self, rel: str = "") -> Path:
        """A local copy of the directory `rel` (under $L2C_STAGING_DIR or the temp dir), downloaded afresh."""
        if self.local:
            return Path(self.path(rel))
        import shutil

        key = hashlib.sha256(self.display(rel).encode()).hexdigest()[:16]
        dest = staging_root() / "fetched" / key
        shutil.rmtree(dest, ignore_errors=True)
        src = self.path(rel)
        self.fs.invalidate_cache(src)
        self.download([p[len(src) :].lstrip("/") for p in self.fs.find(src)], dest, rel)
        return dest

    def download(self, rels: list[str], dest: Path, under: str = "") -> None:
        """Copy the files `rels` (relative to `under` in the store) to the same relative paths below `dest`."""
        for rel in rels:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.path(f"{under}/{rel}" if under else rel), str(target))

    # ------------------------------------------------------------------ writing (atomic)
    def makedirs(self, rel: str = "") -> None:
        if self.local:
            try:
                Path(self.path(rel)).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {self.display(rel)}: {e.strerror or e}") from None

    def check_writable(self) -> None:
        """Create the location and write + remove a probe file, so an unwritable output fails before any work."""
        self.makedirs()
        try:
            self.write_text(".tmp-l2c-probe", "")
            self.remove(".tmp-l2c-probe")
        except OSError as e:
            raise StorageError(f"cannot write to {self.display()}: {e.strerror or e}") from None

    def write_file(self, rel: str, write: Callable[[Path], object]) -> str:
        """Call `write(tmp_path)` to produce the file, then publish it as `rel` atomically; returns its sha256."""
        if self.local:
            with atomic.atomic_path(self.path(rel)) as tmp:
                write(tmp)
            return atomic.sha256_file(self.path(rel))
        fd, name = tempfile.mkstemp(prefix=".tmp-l2c-")
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            digest = atomic.sha256_file(tmp)
            self.fs.put_file(str(tmp), self.path(rel))
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            atomic.write_bytes(self.path(rel), data)
        else:
            self.fs.pipe_file(self.path(rel), data)  # one PUT: the object appears whole or not at all

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def remove(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def remove_stale_tmp(self, subdir: str = "") -> int:
        """Delete the temp files a crashed run left (filesystems only: object stores never show partial uploads)."""
        if not self.local or not Path(self.path(subdir)).is_dir():
            return 0
        return atomic.remove_stale_tmp(self.path(subdir))


def staging_root() -> Path:
    """Where local copies of object-store directories live: $L2C_STAGING_DIR, else the temp dir."""
    return Path(os.environ.get("L2C_STAGING_DIR") or tempfile.gettempdir()) / "l2c-staging"


def as_store(spec: str | Path | Store) -> Store:
    return spec if isinstance(spec, Store) else Store(spec)


class RunDir:
    """A run directory that may live in an object store (`--out s3://bucket/runs/x`).

    Work happens in a local directory: the path itself when the run directory is local, else a staging copy
    under $L2C_STAGING_DIR (default: the temp dir). `pull()` fills the staging copy from the store (small
    files and the newest complete checkpoint, which is what a resume needs); `sync()` uploads what changed,
    each file one atomic upload, checkpoints last (so a stored checkpoint never runs ahead of the metrics it
    resumes) and each checkpoint's `checkpoint.json` after its other files (a checkpoint directory counts as
    stored only with it), and removes stored files that are gone locally (pruned checkpoints, their
    `checkpoint.json` first). Checkpoint directories are `checkpoints/<name>-XXXXXXXX/` (trainer/checkpoint.py).
    """

    CHECKPOINTS = "checkpoints/"
    MARKER = "checkpoint.json"  # written last into a checkpoint directory: the directory is whole

    def __init__(self, spec: str | Path, tag: str = "", exclude: tuple[str, ...] = ("pairing-index/",)):
        self.store = Store(spec)
        self.exclude = exclude
        self._sent: dict[str, tuple[int, int]] = {}  # uploaded (or pulled): rel -> (size, mtime_ns)
        self._stored: set[str] = set()  # files the store holds, as far as this copy knows
        if self.store.local:
            self.local = Path(self.store.root)
        else:
            name = hashlib.sha256(self.store.url.encode()).hexdigest()[:16]
            self.local = staging_root() / "runs" / f"{self.store.url.split('/')[-1]}-{name}{('-' + tag) if tag else ''}"

    @property
    def remote(self) -> bool:
        return not self.store.local

    def display(self, rel: str = "") -> str:
        return self.store.display(rel) if self.remote else str(self.local / rel)

    def _remote_files(self) -> dict[str, int]:
        fs, root = self.store.fs, self.store.path()
        fs.invalidate_cache(root)
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(root) + 1 :]: int(info.get("size") or 0) for p, info in found.items()}

    def _local_files(self) -> dict[str, tuple[int, int]]:
        if not self.local.exists():
            return {}
        out = {}
        for p in self.local.rglob("*"):
            rel = p.relative_to(self.local).as_posix()
            hidden = any(part.startswith((".tmp-", ".old-")) for part in rel.split("/"))  # unfinished writes
            if p.is_file() and not hidden and not rel.startswith(self.exclude):
                st = p.stat()
                out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> int:
        """Make the staging copy mirror the store (the newest complete checkpoint only); returns files downloaded."""
        if not self.remote:
            return 0
        import shutil

        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        files = self._remote_files()
        ckpts = [f[len(self.CHECKPOINTS) :] for f in files if f.startswith(self.CHECKPOINTS)]
        # a checkpoint directory with its marker (`step-00000010/`), or a single file (an earlier layout)
        units = sorted({c.split("/")[0] for c in ckpts if "/" not in c or c.endswith(f"/{self.MARKER}")})
        newest = units[-1:]
        wanted = [f for f in files if not f.startswith(self.CHECKPOINTS)]
        wanted += [self.CHECKPOINTS + c for c in ckpts if newest and (c == newest[0] or c.startswith(newest[0] + "/"))]
        self.store.download(wanted, self.local)
        self._sent = self._local_files()
        self._stored = set(files)
        return len(wanted)

    def sync(self) -> int:
        """Upload files that changed since the last sync, checkpoints last; returns files uploaded."""
        if not self.remote:
            return 0
        now = self._local_files()
        changed = [rel for rel, st in now.items() if self._sent.get(rel) != st]
        changed.sort(key=lambda rel: (rel.startswith(self.CHECKPOINTS), rel.endswith(f"/{self.MARKER}"), rel))
        for rel in changed:
            self.store.fs.put_file(str(self.local / rel), self.store.path(rel))
            self._sent[rel] = now[rel]
        gone = sorted(self._stored - set(now), key=lambda rel: (not rel.endswith(f"/{self.MARKER}"), rel))
        for rel in gone:  # gone locally (pruned checkpoints): gone in the store too, markers first
            self.store.remove(rel)
            self._sent.pop(rel, None)
        self._stored = set(now)
        return len(changed)
