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


@pytest.mark.parametrize(("umask", "files", "dirs"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_folders_follow_the_umask_whatever_wrote_them(tmp_path, umask, files, dirs):
    """A writer that makes its files private (safetensors, save_pretrained: 0600) publishes them with the
    umask's modes; an executable bit it set is kept."""
    old = os.umask(umask)
    try:
        with atomic.atomic_dir(tmp_path / "export") as tmp:
            (tmp / "vision").mkdir(mode=0o700)
            for p in (tmp / "heads.safetensors", tmp / "vision" / "model.safetensors"):
                p.write_bytes(b"x")
                p.chmod(0o600)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    out = tmp_path / "export"
    mode = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert mode == {".": dirs, "vision": dirs, "heads.safetensors": files, "vision/model.safetensors": files,
                    "run.sh": dirs}  # fmt: skip


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_leaves_no_temp(tmp_path, stop):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.json").write_text("{}")
    with pytest.raises(stop):
        with atomic.atomic_dir(tmp_path / "export") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            raise stop()
    with pytest.raises(stop):
        with atomic.atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("{")
            raise stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["old.json"]  # the published one untouched
