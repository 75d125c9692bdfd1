"""Soak: 2,000 small sources through a tiny model, three kill -9 at random points, then a rerun to the end.
Nothing is lost or duplicated, the manifest is valid, and the driver's memory and open files stay flat."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l2c.cache import Manifest, TextCache

N_SOURCES, PER_SOURCE = 2000, 3


def _proc_stats(pid: int) -> tuple[int, int]:
    """(resident set in kB, open file descriptors) of a live process."""
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))  # fmt: skip
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_soak_three_kills_then_complete(tiny_llama, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for s in range(N_SOURCES):
        lines = [json.dumps({"image_id": f"s{s:04d}-{i}", "caption": f"photo {s} shows object {i} on a table"})
                 for i in range(PER_SOURCE)]  # fmt: skip
        (src / f"part-{s:05d}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "l2c.cli", "embed-captions", str(src), "--out", str(out), "--model", str(tiny_llama),
           "--key-field", "image_id", "--text-field", "caption", "--no-progress", "--dtype", "float32"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}

    def done() -> int:
        return len(Manifest.load(out).shards) if (out / "manifest.json").exists() else 0

    rng = random.Random(0)
    kills = []
    for lo, hi in ((50, 400), (600, 1000), (1200, 1600)):
        target = rng.randint(lo, hi)
        proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 900
        while done() < target:
            assert proc.poll() is None and time.time() < deadline, f"job ended or stalled before {target} shards"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append(done())
    assert kills == sorted(kills) and kills[-1] < N_SOURCES

    # the last run, to the end, sampling the driver's memory and open files as the shards go by
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    samples = []  # (shards done, rss kB, fds)
    while proc.poll() is None:
        try:
            samples.append((done(), *_proc_stats(proc.pid)))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            pass
        time.sleep(0.5)
    log = proc.stdout.read()
    assert proc.returncode == 0, log[-3000:]

    cache = TextCache(out)
    assert cache.validate() == [] and len(cache.shard_names) == N_SOURCES and len(cache) == N_SOURCES * PER_SOURCE
    keys, _, _ = cache.load()
    assert len(set(keys)) == len(keys) == N_SOURCES * PER_SOURCE  # nothing duplicated
    assert not list(out.glob(".tmp-*")) and not list((out / "manifest.d").glob("*.json"))  # journal folded in
    assert json.loads((out / "manifest.json").read_text())["totals"]["shards"] == N_SOURCES

    running = [s for s in samples if kills[-1] + 50 <= s[0] < N_SOURCES - 20]
    assert len(running) >= 4, samples[-10:]
    early, late = running[: len(running) // 4], running[-(len(running) // 4) :]
    rss_growth_mb = (max(s[1] for s in late) - max(s[1] for s in early)) / 1024
    fd_growth = max(s[2] for s in late) - max(s[2] for s in early)
    print(f"soak: killed at {kills} shards; last run {running[0][0]}..{running[-1][0]}: driver RSS "
          f"{max(s[1] for s in early) / 1024:.0f} -> {max(s[1] for s in late) / 1024:.0f} MB, fds {fd_growth:+d}")
    assert rss_growth_mb < 150, (rss_growth_mb, early[:3], late[-3:])
    assert fd_growth <= 8, (fd_growth, early[:3], late[-3:])
