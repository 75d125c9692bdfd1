"""Atomic writes publish whole files with the mode the umask gives (shared storage users can read them)."""

import os
import stat

import pytest

from l2c import atomic
from l2c.storage import Store


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_published_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "info.json", {"a": 1})
        digest = Store(tmp_path).write_file("shard.parquet", lambda p: p.write_bytes(b"x" * 10))
        with atomic.atomic_path(tmp_path / "plot.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    for name in ("info.json", "shard.parquet", "plot.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert digest == atomic.sha256_file(tmp_path / "shard.parquet")
    assert not list(tmp_path.glob(".tmp-*"))
