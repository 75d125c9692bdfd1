"""Soak: train-vision killed at random points (SIGKILL), a damaged cache and a concurrent second run in between,
then run to the end: the run equals an uninterrupted one (same data order, losses and exported weights)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from l2c.trainer.vision.export import load_exported
from tests.trainer.vision.train_helpers import TINY_VIT, class_cache_for, class_vectors, write_class_shards

ROOT = Path(__file__).resolve().parents[3]
OVER = [f"model.vision.config={json.dumps(TINY_VIT)}", "model.embed_dim=24", "model.adapter.n_blocks=2",
        "batch_size=16", "steps=40", "optim.lr=2e-3", "optim.warmup_steps=2", "precision=fp32", "log_every=1",
        "checkpoint_every=4", "data.workers=1", "data.shuffle_buffer=32", "torch_threads=1"]  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_soak_kill_damage_concurrent_then_equal_to_uninterrupted(tmp_path):
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=3, per_shard=24, n_classes=4, seed=5)
    vecs = class_vectors(4, 16)
    cache = class_cache_for(tars, labels, tmp_path / "cache", vecs, fields=("txt", "json:long_caption"), noise=0.05)
    bad = vecs.copy()
    bad[1, 3] = np.nan
    nan_cache = class_cache_for(tars, labels, tmp_path / "nan-cache", bad, fields=("txt", "json:long_caption"))
    images = [a for t in tars for a in ("--images", str(t))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cmd(out: Path, text_cache: Path = cache) -> list[str]:
        return [sys.executable, "-m", "l2c.cli", "train-vision", *images, "--text-cache", str(text_cache), "--out",
                str(out), "--no-progress", *OVER]  # fmt: skip

    subprocess.run(cmd(tmp_path / "full"), check=True, env=env, capture_output=True)
    run, rng = tmp_path / "soak", random.Random(0)
    for round_ in range(3):
        proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while not (run / ".l2c-lock.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.05)
        if round_ == 1:  # a second run into the same --out while this one holds it: refused, nothing written
            second = subprocess.run(cmd(run), env=env, capture_output=True, text=True)
            assert second.returncode == 2 and "in use by another train-vision job" in second.stderr
        target = rng.randint(3, 8) + 12 * round_  # a random step of this round's third of the schedule (8+ left)
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= target):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))  # anywhere in a step: a checkpoint may be half written
        assert proc.poll() is None, "the run ended before it was killed: the test's steps are too fast"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # the damaged cache is refused before a step: the run directory is left as it was
        before = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
        damaged = subprocess.run(cmd(run, nan_cache), env=env, capture_output=True, text=True)
        assert damaged.returncode == 2 and "are not finite" in damaged.stderr, damaged.stderr
        after = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
        assert after == before
    subprocess.run(cmd(run), check=True, env=env, capture_output=True)  # rerun the same command: it resumes

    a, b = metrics(tmp_path / "full"), metrics(run)
    assert [r["step"] for r in b] == list(range(1, 41))
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)
    wa, wb = load_exported(tmp_path / "full").state_dict(), load_exported(run).state_dict()
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
