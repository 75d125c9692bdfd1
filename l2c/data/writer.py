"""Write webdataset shards atomically.

Each shard is written as `DIR/.tmp-shard-000000.tar.<random>` and renamed to `DIR/shard-000000.tar` only
when it is complete, so a crashed or interrupted run never leaves a partial tar under a final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import webdataset as wds

from l2c import atomic

SHARD_PATTERN = "shard-{:06d}.tar"


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def list_shards(directory: str | Path) -> list[Path]:
    """Final-named shards in a directory, in order (temp files are never listed)."""
    return sorted(Path(directory).glob("shard-[0-9]*.tar"))


def encode_sample(key: str, image: bytes, image_ext: str, txt: str, meta: dict, **extra: str) -> dict:
    """A webdataset sample whose members are all bytes, so the tar content does not depend on encoders."""
    if "." in key or not key:
        raise ValueError(f"invalid sample key {key!r}: webdataset splits member names at the first '.'")
    sample = {
        "__key__": key,
        image_ext: image,
        "txt": txt.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
    }
    sample.update({k: v.encode("utf-8") for k, v in extra.items()})
    return sample


class AtomicShardWriter:
    """Like `webdataset.ShardWriter` (at most `shard_size` samples per tar), but every shard is atomic.

    Use as a context manager: on a clean exit the last shard is finished; on an exception the shard in
    progress is deleted and nothing partial keeps a final name. `on_shard` is called with
    (path, keys) after each shard is renamed into place.
    """

    def __init__(
        self,
        directory: str | Path,
        shard_size: int,
        start_shard: int = 0,
        on_shard: Callable[[Path, list[str]], None] | None = None,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.next_index = start_shard
        self.on_shard = on_shard
        self.shards: list[Path] = []
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._keys: list[str] = []

    def _open(self) -> None:
        self._final = self.directory / shard_name(self.next_index)
        self._tmp = atomic.tmp_path_for(self._final)
        self._file = open(self._tmp, "wb")
        # mtime fixed: the same samples give byte-identical tars.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0)
        self._keys = []
        self.next_index += 1

    def write(self, sample: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._keys.append(sample["__key__"])
        if len(self._keys) >= self.shard_size:
            self.finish_shard()

    def finish_shard(self) -> None:
        """Close the shard in progress and rename it into place (no-op when none is open)."""
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)
        self.shards.append(self._final)
        final, keys = self._final, self._keys
        self._tar = self._file = self._tmp = self._final = None
        self._keys = []
        if self.on_shard is not None:
            self.on_shard(final, keys)

    def abort(self) -> None:
        """Drop the shard in progress; finished shards stay."""
        try:
            if self._tar is not None:
                self._tar.close()  # flushes into the temp file, which is deleted below
            if self._file is not None:
                self._file.close()
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = self._final = None
        self._keys = []

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish_shard()
        else:
            self.abort()

