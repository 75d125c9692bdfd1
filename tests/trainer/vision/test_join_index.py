"""The join index: built once per cache and kept (across starts, shared by ranks), refused above
data.join_max_rows with the estimate and the align-cache command; a run of tars with and without a shard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2c.cache import CacheError, TextCache
from l2c.data.shards import read_tar
from l2c.storage import RunDir
from l2c.trainer.job import TrainJob
from l2c.trainer.vision import join_index
from l2c.trainer.vision.loop import train
from l2c.trainer.vision.pairing import plan_tars
from tests.trainer.vision.test_train_vision import DIM, ROOT, TINY_ARGS, tiny_cfg
from tests.trainer.vision.train_helpers import class_vectors, write_cache, write_class_shards

FIELDS = ["txt", "json:long_caption"]


def rows_of(keys, labels, vecs, bump: float = 0.0):
    return [(k, f, vecs[labels[k]] + bump + (j == 1)) for k in keys for j, f in enumerate(FIELDS)]


@pytest.fixture(scope="module")
def apart(tmp_path_factory):
    """3 tars x 16 class images; captions embedded apart from the tars, into two tables named otherwise (the
    usual case: dense captions of existing tars), and a cache with shards of their own for tars 0 and 1 only."""
    root = tmp_path_factory.mktemp("apart")
    tars, labels = write_class_shards(root / "tars", n_shards=3, per_shard=16, n_classes=4)
    vecs = class_vectors(4, DIM)
    keys = sorted(labels)
    tables = {"captions-a": ("captions-a.jsonl", rows_of(keys[:20], labels, vecs)),
              "captions-b": ("captions-b.jsonl", rows_of(keys[20:], labels, vecs))}  # fmt: skip
    apart = write_cache(root / "apart", tables, DIM, FIELDS)
    by_tar = {t.stem: (str(t.resolve()), rows_of([s["__key__"] for s in read_tar(str(t))], labels, vecs)) for t in tars}
    mixed = {n: v for n, v in by_tar.items() if not n.endswith("2")}
    mixed["captions-c"] = ("captions-c.jsonl", by_tar[tars[2].stem][1])  # tar 2's captions, in a table of their own
    return [str(t) for t in tars], labels, vecs, apart, write_cache(root / "mixed", mixed, DIM, FIELDS)


def test_the_index_is_built_once_per_cache_and_kept(apart, tmp_path):
    tars, labels, vecs, cache, _ = apart
    tc = TextCache(cache)
    run = RunDir(tmp_path / "run")
    d, built = join_index.prepare(tc, run, main=True)
    assert built and d == tmp_path / "run" / "pairing-index" / join_index.index_key(tc)
    stat = (d / "vectors.npy").stat()
    assert join_index.prepare(tc, run, main=True) == (d, False)  # a later start: reused, untouched
    assert join_index.prepare(tc, run, main=False) == (d, False)  # another rank never builds
    assert (d / "vectors.npy").stat().st_mtime_ns == stat.st_mtime_ns
    meta = json.loads((d / "index.json").read_text())
    assert (meta["n_keys"], meta["n_rows"], sorted(meta["fields"])) == (48, 96, sorted(FIELDS))
    # the cache changes (a shard re-embedded): a new index under a new name, the old one removed
    keys = sorted(labels)
    write_cache(cache, {"captions-a": ("captions-a.jsonl", rows_of(keys[:20], labels, vecs, bump=1.0)),
                        "captions-b": ("captions-b.jsonl", rows_of(keys[20:], labels, vecs))}, DIM, FIELDS)  # fmt: skip
    tc2 = TextCache(cache)
    d2, built2 = join_index.prepare(tc2, run, main=True)
    assert built2 and d2 != d and not d.exists() and [p.name for p in d2.parent.iterdir()] == [d2.name]
    vec = np.load(d2 / "vectors.npy", mmap_mode="r")
    np.testing.assert_allclose(vec[0], vecs[labels[keys[0]]] + 1.0, atol=1e-2)


PREPARE = """
import json, sys
from l2c.cache import TextCache
from l2c.storage import RunDir
from l2c.trainer.vision import join_index
d, built = join_index.prepare(TextCache(sys.argv[1]), RunDir("s3://bucket/runs/r"), main=False)
print(json.dumps([str(d), built]))
"""


def test_an_object_store_run_builds_the_index_once_per_machine(apart, tmp_path):
    """Two ranks of an object-store run on one machine at once: one builds in the machine's staging dir, the other
    waits on the lock and reuses it; so does a later start."""
    tars, labels, vecs, cache, _ = apart
    env = {**os.environ, "L2C_STAGING_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def start():
        return subprocess.Popen([sys.executable, "-c", PREPARE, str(cache)], env=env, stdout=subprocess.PIPE, text=True)

    ranks = [start(), start()]
    got = sorted((tuple(json.loads(p.communicate(timeout=120)[0])) for p in ranks), key=lambda x: x[1])
    later = tuple(json.loads(start().communicate(timeout=120)[0]))
    want = str(tmp_path / "l2c-staging" / "pairing-index" / join_index.index_key(TextCache(cache)))
    assert got == [(want, False), (want, True)] and later == (want, False)


def test_join_above_the_limit_is_refused_with_the_estimate_and_the_command(apart, tmp_path, refused):
    tars, _, _, cache, mixed = apart
    tc = TextCache(cache)
    est = join_index.estimate(tc)
    assert est["rows"] == 96 and est["bytes"] == 96 * DIM * 2 and est["seconds"] > 0
    command = f"l2c align-cache --text-cache {tc.dir} " + " ".join(f"--images {t}" for t in tars) + " --out DIR"
    for mode in ("join", "auto"):
        with pytest.raises(CacheError) as e:
            plan_tars(tc, tars, mode, 95, images=tars)
        msg = str(e.value)
        assert "96 rows" in msg and "MB of vectors" in msg and re.search(r"~\d+ s to build", msg), msg
        assert "data.join_max_rows=95" in msg and f"`{command}`" in msg, msg
        if mode == "auto":  # names the tars the cache has no shard for
            assert msg.startswith(f"3 of 3 tar(s) have no cache shard of their own (first: {', '.join(tars)})")
    assert plan_tars(tc, tars, "join", 96).join_estimate == est  # at the limit: built
    # a mix: only the tars without a shard need the join, and the refusal names those
    with pytest.raises(CacheError, match=re.escape(f"1 of 3 tar(s) have no cache shard of their own (first: {tars[2]})")):
        plan_tars(TextCache(mixed), tars, "auto", 10)
    # the command: one line, exit 2, before any step
    out = tmp_path / "run"
    args = ["train-vision", *[a for t in tars for a in ("--images", t)], "--text-cache", cache, "--out", out,
            "--no-progress", "data.join_max_rows=50", "data.workers=0", *TINY_ARGS]  # fmt: skip
    refused(args, r"l2c: error: data.pairing=auto|3 of 3 tar\(s\) .*96 rows.*l2c align-cache --text-cache")
    assert not (out / "checkpoints").exists() and not (out / "pairing-index").exists()


def test_a_mixed_run_says_which_pairing_for_which_tars_and_reuses_the_index(apart, tmp_path, caplog):
    tars, labels, _, _, mixed = apart
    n = len(labels)
    cfg = tiny_cfg(f"batch_size={n}", "steps=1", "optim.warmup_steps=0", "data.shuffle_buffer=0")
    with caplog.at_level("INFO", logger="l2c"):
        summary = train(TrainJob(cfg, tars, mixed, tmp_path / "run", progress=False))
    assert summary["samples_seen"] == n and summary["skips"] == dict.fromkeys(summary["skips"], 0)
    assert summary["pairing"] == {"pairing": "mixed", "aligned_tars": 2, "join_tars": 1, "tars_without_cache_shard": 1}
    assert (f"pairing: aligned for 2 tar(s); join by key for 1 tar(s), 1 without a cache shard of their own "
            f"(first: {tars[2]})") in caplog.text  # fmt: skip
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())
    index = Path(skips["join_index"]["dir"])
    assert skips["first_tars_without_cache_shard"] == [tars[2]] and skips["join_index"]["rows"] == 96
    assert skips["join_index"]["built_by_ranks"] == [0] and index.parent == tmp_path / "run" / "pairing-index"
    built = (index / "index.json").stat().st_mtime_ns
    # a second start (the schedule extended): the index is reused as it is
    cfg2 = tiny_cfg(f"batch_size={n}", "steps=2", "optim.warmup_steps=0", "data.shuffle_buffer=0")
    done = train(TrainJob(cfg2, tars, mixed, tmp_path / "run", progress=False))
    assert done["resumed_from"] == 1 and done["samples_seen"] == 2 * n
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())
    assert skips["join_index"]["built_by_ranks"] == [] and (index / "index.json").stat().st_mtime_ns == built


@pytest.mark.slow
def test_two_ranks_two_starts_build_the_join_index_once(apart, ray_local, tmp_path):
    from l2c.trainer.vision.loop import train_on_ray

    tars, _, _, cache, _ = apart
    out = tmp_path / "run"
    marks = []
    for steps in (3, 5):
        cfg = tiny_cfg(f"steps={steps}", "batch_size=8", "checkpoint_every=100", "optim.warmup_steps=0")
        summary = train_on_ray(TrainJob(cfg, tars, cache, out, workers=2))
        assert summary["world_size"] == 2 and summary["step"] == steps
        skips = json.loads((out / "data_skips.json").read_text())
        assert skips["pairing"] == "join" and skips["join_tars"] == 3
        marks.append(skips["join_index"]["built_by_ranks"])
        index = Path(skips["join_index"]["dir"])
        assert [p.name for p in (out / "pairing-index").iterdir()] == [index.name]
        marks.append((index / "index.json").stat().st_mtime_ns)
    assert marks[0] == [0] and marks[2] == [] and marks[1] == marks[3]  # rank 0 at the first start, never again
