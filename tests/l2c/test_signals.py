"""One line for every failure, as a user meets it: real `l2c` processes stopped by real SIGINT / SIGTERM
(exit 130 / 143, "stopped; rerun the same command to resume", no temp file left, the rerun completes), a real
EACCES (a folder without write permission) and a real EFBIG (`ulimit -f`: RLIMIT_FSIZE), each one line
naming the path and the error, exit 1."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from l2c.errors import os_error_line

STOPPED = "stopped by {}; rerun the same command to resume"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """400 noisy 256 px PNGs and their captions: make-shards re-encodes them (--max-side), a few seconds' work."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(400):
            Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"image_id": f"k{i}", "file": f"{i}.png", "captions": [f"noise {i}"]}) + "\n")
    return root, root / "captions.jsonl"


def l2c(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "l2c.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def make_shards(photos, out, *extra):
    return ["make-shards", photos[0], "--captions", photos[1], "--out", out, "--workers", "1", "--shard-size", "20",
            "--max-side", "250", "--quality", "100", *extra]  # fmt: skip


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".tmp-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_is_one_line_and_the_rerun_completes(sig, photos, tmp_path):
    whole = tmp_path / "whole"
    assert l2c(*make_shards(photos, whole)).wait(120) == 0
    out = tmp_path / "stopped"
    proc = l2c(*make_shards(photos, out))
    deadline = time.time() + 120
    while not (out / "shard-000002.tar").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "make-shards finished before it could be stopped"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == "l2c: " + STOPPED.format(signal.Signals(sig).name), err
    assert "Traceback" not in err and leftovers(out) == [] and not (out / "info.json").exists()
    assert 3 <= len(digests(out)) < 20  # the finished shards are kept
    rerun = l2c(*make_shards(photos, out))
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert digests(out) == digests(whole) and len(digests(out)) == 20


def test_sigterm_mid_embed_removes_the_shard_in_flight(ray_local, tmp_path):
    """embed-captions in its own process: SIGTERM while shards are written leaves finished shards, no temp
    file and no lock; the rerun adds the rest."""
    sources = []
    for s in range(40):
        rows = [{"image_id": f"{s}-{i}", "caption": f"photo {i} of set {s}: a dog runs on the grass by a lake"}
                for i in range(300)]  # fmt: skip
        sources.append(tmp_path / f"part-{s:02d}.jsonl")
        sources[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cache"
    args = ["embed-captions", *sources, "--out", out, "--key-field", "image_id", "--text-field", "caption",
            "--model", "minilm", "--no-progress", "--runner", "local"]  # fmt: skip
    proc = l2c(*args)
    deadline = time.time() + 300
    while len(list(out.glob("*.parquet"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "l2c: " + STOPPED.format("SIGTERM") and "Traceback" not in err
    done = sorted(p.name for p in out.glob("*.parquet"))
    assert 2 <= len(done) < 40 and leftovers(out) == [] and not (out / ".l2c-lock.json").exists()
    rerun = l2c(*args)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    from l2c.cache import TextCache

    assert len(TextCache(out)) == 40 * 300 and TextCache(out).validate() == []


def without_root_override():
    """As root, drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the child, so file permissions apply to it."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_one_line_naming_the_path(photos, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = l2c(*make_shards(photos, out), preexec_fn=without_root_override)
        _, err = proc.communicate(timeout=120)
    except subprocess.SubprocessError as e:  # no CAP_SETPCAP to drop root's override: cannot make EACCES
        pytest.skip(f"cannot drop root's permission override here: {e}")
    finally:
        out.chmod(0o755)
    assert proc.returncode == 1, err
    (line,) = [ln for ln in err.strip().splitlines() if ln.startswith("l2c:")]
    assert line.startswith(f"l2c: error: {out}") and line.endswith("Permission denied (EACCES)"), err
    assert "Traceback" not in err and os.listdir(out) == []


def file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_too_large_is_one_line_naming_the_path(photos, tmp_path):
    out = tmp_path / "shards"
    proc = l2c(*make_shards(photos, out), preexec_fn=file_size_limit(1 << 20))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == f"l2c: error: {out}: File too large (EFBIG)", err
    assert leftovers(out) == [] and all(p.stat().st_size <= 1 << 20 for p in out.iterdir() if p.is_file())

    captions = tmp_path / "c.jsonl"
    captions.write_text("".join(json.dumps({"image_id": str(i), "caption": f"a dog, number {i}"}) + "\n"
                                for i in range(200)))  # fmt: skip
    cache = tmp_path / "cache"
    proc = l2c("embed-captions", captions, "--out", cache, "--key-field", "image_id", "--text-field", "caption",
               "--model", "minilm", "--no-progress", preexec_fn=file_size_limit(64 << 10))  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == f"l2c: error: {cache}/c.parquet: File too large (EFBIG)", err
    assert leftovers(cache) == [] and not (cache / ".l2c-lock.json").exists()


def test_os_error_lines():
    assert os_error_line(OSError(errno.ENOSPC, "x", "/data/cache/a.parquet")) == \
        "/data/cache/a.parquet: No space left on device (ENOSPC)"  # fmt: skip
    assert os_error_line(OSError(errno.EROFS, "x", "/mnt/ro/.tmp-shard-000001.tar.ab12cd_9")) == \
        "/mnt/ro/shard-000001.tar: Read-only file system (EROFS)"  # fmt: skip
    assert os_error_line(OSError(errno.EEXIST, "x", "/a", None, "/b")) == "/a -> /b: File exists (EEXIST)"
