"""train-vision end to end on real tars and a real Parquet cache: learning, exact skip counts, resume, refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from l2c.cache import CacheError, TextCache
from l2c.cli import main
from l2c.config import load_config
from l2c.teacher import TeacherMismatch, TeacherSpec
from l2c.trainer.checkpoint import latest_checkpoint, load_checkpoint
from l2c.trainer.job import TrainJob
from l2c.trainer.vision.config import TrainConfig
from l2c.trainer.vision.export import load_exported
from l2c.trainer.vision.loop import ResumeError, train
from tests.trainer.vision.train_helpers import (
    TINY_VIT,
    class_cache_for,
    class_image,
    class_vectors,
    jpeg_bytes,
    write_cache,
    write_class_shards,
)

DIM = 16
ROOT = Path(__file__).resolve().parents[3]


def tiny_cfg(*overrides: str) -> TrainConfig:
    base = [f"model.vision.config={json.dumps(TINY_VIT)}", "model.embed_dim=24", "model.adapter.n_blocks=2",
            "batch_size=16", "steps=40", "optim.lr=2e-3", "optim.warmup_steps=2", "precision=fp32",
            "log_every=1", "checkpoint_every=10", "data.workers=0", "data.shuffle_buffer=32", "torch_threads=1"]
    return load_config(TrainConfig, None, base + list(overrides))


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """4 classes x 3 shards of 32 images, and an aligned cache holding each image's class vector (+ noise)."""
    root = tmp_path_factory.mktemp("classes")
    tars, labels = write_class_shards(root / "tars", n_shards=3, per_shard=32, n_classes=4, seed=0)
    vecs = class_vectors(4, DIM)
    cache = class_cache_for(tars, labels, root / "cache", vecs, fields=("txt", "json:long_caption"), noise=0.05)
    return tars, labels, vecs, cache


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_learns_class_structure_and_exports(classes, tmp_path):
    tars, labels, vecs, cache = classes
    run = tmp_path / "run"
    summary = train(TrainJob(tiny_cfg(), [str(t) for t in tars], cache, run, progress=False))
    assert summary["finished"] and summary["step"] == 40 and summary["samples_seen"] == 40 * 16
    assert summary["skips"] == dict.fromkeys(summary["skips"], 0)  # clean data: nothing skipped
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "lr", "logit_scale", "images_per_s", "data_wait"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.5, (first, last)
    assert (run / "curves.png").stat().st_size > 5000 and (run / "config.yaml").exists()

    # the export classifies held-out images by their class vector through the adapter
    acc = held_out_accuracy(run, vecs)
    assert acc >= 0.6, acc  # chance is 0.25
    assert load_exported(run).meta.teacher == TextCache(cache).teacher

    # the same run on pairs whose text is shuffled across images learns nothing
    rng = np.random.default_rng(5)
    keys = sorted(labels)
    shuffled = dict(zip(keys, rng.permutation([labels[k] for k in keys]).tolist(), strict=True))
    bad = class_cache_for(tars, shuffled, tmp_path / "shuffled", vecs, fields=("txt", "json:long_caption"), noise=0.05)
    train(TrainJob(tiny_cfg(), [str(t) for t in tars], bad, tmp_path / "run-shuffled", progress=False))
    acc_shuffled = held_out_accuracy(tmp_path / "run-shuffled", vecs)
    assert acc_shuffled <= 0.45 and acc - acc_shuffled >= 0.3, (acc, acc_shuffled)


def held_out_accuracy(run: Path, vecs: np.ndarray, n: int = 64) -> float:
    """Fresh class images (never trained on) matched to the class vectors through the exported model."""
    model = load_exported(run)
    rng = np.random.default_rng(99)
    truth = [int(c) for c in rng.integers(0, len(vecs), n)]
    pixels = torch.stack([model.preprocess(class_image(c, rng)) for c in truth])
    with torch.no_grad():
        pred = (model.encode_image(pixels) @ model.encode_text(torch.from_numpy(vecs)).T).argmax(1)
    return float((pred.numpy() == np.array(truth)).mean())


def test_caption_fields_sampled_by_weight(classes, tmp_path):
    tars, _, _, cache = classes
    seen: dict[str, int] = {}
    cfg = tiny_cfg("steps=12", "data.caption_weights={txt: 3, 'json:long_caption': 1}")
    from l2c.trainer.vision.data import StreamSpec
    from l2c.trainer.vision.loader import make_loader
    from l2c.trainer.vision.pairing import plan_pairing
    from l2c.trainer.vision.tower import ImageSpec

    pairing = plan_pairing(TextCache(cache), [str(t) for t in tars], "auto", ["txt", "json:long_caption"],
                           tmp_path / "index")
    spec = StreamSpec(shards=[str(t) for t in tars], pairing=pairing, image_spec=ImageSpec([32, 32], None, [0.5] * 3, [0.5] * 3),
                      batch_size=16, seed=0, rank=0, world_size=1, num_workers=0,
                      field_weights=dict(cfg.data.caption_weights))
    it = iter(make_loader(spec))
    for _ in range(20):
        for f in next(it)["fields"]:
            seen[f] = seen.get(f, 0) + 1
    share = seen["txt"] / sum(seen.values())
    assert 0.65 < share < 0.85, seen  # 3:1 weights -> 0.75


def _bad_data(root: Path) -> tuple[list[Path], Path]:
    """3 tars x 10 samples with a corrupt jpeg, a sample with no image, a key with no vector, 2 stray vectors."""
    rng = np.random.default_rng(1)
    tars, rows_by_tar = [], {}
    vec = class_vectors(1, DIM)[0]
    (root / "tars").mkdir(parents=True)
    for s in range(3):
        path = root / "tars" / f"bad-{s:06d}.tar"
        rows = []
        with wds.TarWriter(str(path)) as w:
            for i in range(10):
                key = f"s{s}_{i:03d}"
                sample = {"__key__": key, "txt": f"caption {key}"}
                if (s, i) == (0, 3):
                    sample["jpg"] = b"\xff\xd8 this is not a jpeg"
                elif (s, i) != (1, 2):
                    sample["jpg"] = jpeg_bytes(class_image(i % 4, rng))
                w.write(sample)
                if (s, i) != (0, 5):
                    rows.append((key, "txt", vec + 0.1 * rng.standard_normal(DIM).astype(np.float32)))
        if s == 0:
            rows += [(f"stray_{j}", "txt", vec) for j in range(2)]
        rows_by_tar[path.stem] = (str(path.resolve()), rows)
        tars.append(path)
    return tars, write_cache(root / "cache", rows_by_tar, DIM, ["txt"])


def test_bad_samples_counted_exactly_never_shifted(tmp_path):
    tars, cache = _bad_data(tmp_path)
    cfg = tiny_cfg("batch_size=9", "steps=3", "data.shuffle_buffer=0", "data.shuffle_shards=false")
    summary = train(TrainJob(cfg, [str(t) for t in tars], cache, tmp_path / "run", progress=False))
    # 30 samples, 3 unusable: exactly one epoch of 27 pairs in 3 batches of 9
    assert summary["samples_seen"] == 27
    assert summary["skips"] == {"missing_vector": 1, "missing_image": 1, "corrupt_image": 1, "image_too_large": 0,
                                "vector_without_image": 2, "misordered": 0, "duplicate_member": 0, "shard_error": 0}
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())
    assert skips["pairing"] == "aligned"
    assert skips["examples"] == {"corrupt_image": ["s0_003"], "missing_vector": ["s0_005"],
                                 "missing_image": ["s1_002"]}


def test_planted_permutation_detected(classes, tmp_path):
    """A cache shard whose rows are not in its tar's key order: an error when aligned, a counted join in auto."""
    tars, labels, vecs, _ = classes
    import pyarrow.parquet as pq

    cache = class_cache_for(tars, labels, tmp_path / "cache", vecs)
    path = tmp_path / "cache" / "shard-000001.parquet"
    table = pq.read_table(path)
    order = list(range(table.num_rows))
    order[3], order[7] = order[7], order[3]
    rows = [(table["key"][i].as_py(), "txt", np.asarray(table["embedding"][i].as_py(), np.float32)) for i in order]
    others = {}
    for name in ("shard-000000", "shard-000002"):
        t = pq.read_table(tmp_path / "cache" / f"{name}.parquet")
        others[name] = [(t["key"][i].as_py(), "txt", np.asarray(t["embedding"][i].as_py(), np.float32))
                        for i in range(t.num_rows)]
    sources = {e.file.split(".")[0]: e.source for e in TextCache(cache).manifest.shards.values()}
    cache = write_cache(tmp_path / "cache", {n: (sources[n], r) for n, r in
                                             {**others, "shard-000001": rows}.items()}, DIM, ["txt"])
    images = [str(t) for t in tars]
    with pytest.raises(CacheError, match="not in the key order"):
        train(TrainJob(tiny_cfg("data.pairing=aligned", "steps=3"), images, cache, tmp_path / "a", progress=False))
    n = 3 * 32
    cfg = tiny_cfg("data.pairing=auto", f"batch_size={n}", "steps=1", "optim.warmup_steps=0",
                   "data.shuffle_buffer=0")
    summary = train(TrainJob(cfg, images, cache, tmp_path / "b", progress=False))
    assert summary["samples_seen"] == n and summary["skips"]["misordered"] == 2  # both swapped keys
    assert summary["skips"]["missing_vector"] == 0 and summary["skips"]["vector_without_image"] == 0


def test_join_pairing_when_cache_is_not_shard_aligned(classes, tmp_path):
    tars, labels, vecs, _ = classes
    keys = sorted(labels)
    dropped = keys[::10]
    rows = [(k, "txt", vecs[labels[k]]) for k in keys if k not in dropped]
    cache = write_cache(tmp_path / "cache", {"all": ("captions.jsonl", rows)}, DIM, ["txt"])
    n = len(keys) - len(dropped)
    cfg = tiny_cfg(f"batch_size={n}", "steps=1", "optim.warmup_steps=0", "data.shuffle_buffer=0")
    summary = train(TrainJob(cfg, [str(t) for t in tars], cache, tmp_path / "run", progress=False))
    assert summary["samples_seen"] == n and summary["skips"]["missing_vector"] == len(dropped)
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())
    assert skips["pairing"] == "join" and sorted(skips["examples"]["missing_vector"]) == dropped
    with pytest.raises(CacheError, match="pairing=aligned"):
        train(TrainJob(tiny_cfg("data.pairing=aligned"), [str(t) for t in tars], cache, tmp_path / "run2", progress=False))


def test_cache_and_resume_refusals(classes, tmp_path):
    tars, labels, vecs, cache = classes
    images = [str(t) for t in tars]
    with pytest.raises(CacheError, match="dim"):
        train(TrainJob(tiny_cfg("model.text_dim=32"), images, cache, tmp_path / "a", progress=False))
    train(TrainJob(tiny_cfg("steps=4"), images, cache, tmp_path / "run", max_steps=2, progress=False))
    with pytest.raises(ResumeError, match="holds checkpoints .*leave out --no-resume"):
        train(TrainJob(tiny_cfg("steps=4"), images, cache, tmp_path / "run", resume=False, progress=False))
    with pytest.raises(ResumeError, match="holds no checkpoint"):
        train(TrainJob(tiny_cfg("steps=4"), images, cache, tmp_path / "fresh", resume=True, progress=False))
    # settings that would not take effect on resume are refused, each named with its old and new value
    with pytest.raises(ResumeError, match=r"model.embed_dim: run 24, now 32; optim.lr: run 0.002, now 0.01"):
        train(TrainJob(tiny_cfg("steps=4", "model.embed_dim=32", "optim.lr=1e-2"), images, cache, tmp_path / "run",
                       progress=False))  # fmt: skip
    with pytest.raises(ResumeError, match=r"batch_size: run 16, now 8"):
        train(TrainJob(tiny_cfg("steps=4", "batch_size=8"), images, cache, tmp_path / "run", progress=False))
    # a safe change applies and is recorded: the schedule is extended, config.yaml says what ran
    done = train(TrainJob(tiny_cfg("steps=6", "log_every=3"), images, cache, tmp_path / "run", progress=False))
    assert done["step"] == 6 and done["resumed_from"] == 2
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml").steps == 6
    other = class_cache_for(tars, labels, tmp_path / "other", vecs, fields=("txt", "json:long_caption"))
    from l2c.cache import Manifest

    m = Manifest.load(other)
    m.settings["model_fingerprint"] = "another-encoder"
    m.save(other)
    with pytest.raises(TeacherMismatch, match="model_fingerprint: the run fp-test…, the cache another-enco"):
        train(TrainJob(tiny_cfg("steps=4"), images, other, tmp_path / "run", resume=True, progress=False))
    # every identity key of the teacher: a resume on a cache made another way is refused, naming key and values
    from l2c.teacher import IDENTITY

    changed = {"engine": "vllm", "pooling": "cls", "prompt_format": "llm2vec-llama3", "instruction": "Describe.",
               "normalize": False, "max_length": 64, "dtype": "bfloat16", "store_dtype": "float32",
               "bidirectional": False, "model_fingerprint": "beef"}  # fmt: skip
    assert set(changed) == set(IDENTITY)
    for key, value in changed.items():
        m = Manifest.load(other)
        m.settings = {**Manifest.load(cache).settings, key: value}
        m.save(other)
        mine = TeacherSpec.from_dict(Manifest.load(cache).settings).identity()[key]
        with pytest.raises(TeacherMismatch) as e:
            train(TrainJob(tiny_cfg("steps=4"), images, other, tmp_path / "run", resume=True, progress=False))
        shown = (f"{mine[:16]}…", f"{value}…") if key == "model_fingerprint" else (repr(mine), repr(value))
        assert f"{key}: the run {shown[0]}, the cache {shown[1]}" in str(e.value), str(e.value)
    # the CLI says it in one line, exit code 2
    rc = main(["train-vision", "--images", images[0], "--text-cache", str(cache), "--out", str(tmp_path / "run"),
               f"model.vision.config={json.dumps(TINY_VIT)}"])
    assert rc == 2


def test_resume_after_max_steps_equals_uninterrupted(classes, tmp_path):
    tars, _, _, cache = classes
    images = [str(t) for t in tars]
    cfg = tiny_cfg("steps=12", "checkpoint_every=4", "data.workers=2")
    full = train(TrainJob(cfg, images, cache, tmp_path / "full", progress=False))
    assert full["finished"] and full["samples_seen"] == 12 * 16
    part = train(TrainJob(cfg, images, cache, tmp_path / "part", max_steps=5, progress=False))
    assert part["step"] == 5 and not part["finished"] and part["stopped_by"] == "max_steps"
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.2')  # what a kill -9 mid-write leaves: half a line
    resumed = train(TrainJob(cfg, images, cache, tmp_path / "part", resume=True, progress=False))
    assert resumed["finished"] and resumed["resumed_from"] == 5
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]  # the same samples in the same order
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)
    wa = load_exported(tmp_path / "full").state_dict()
    wb = load_exported(tmp_path / "part").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_everything_on_object_store_trains_and_resumes_the_same(classes, s3_bucket, tmp_path, monkeypatch):
    """Tars, cache and run directory in an S3 bucket: the same pairs, losses and weights as on local disk, and
    a run stopped on one machine resumes on another (a fresh staging dir) from the stored checkpoint."""
    import fsspec

    from l2c.storage import Store

    tars, _, _, cache = classes
    fs = fsspec.filesystem("s3")
    for p in [*tars, *Path(cache).iterdir()]:
        fs.put_file(str(p), f"{s3_bucket[5:]}/{'tars' if p.suffix == '.tar' else 'cache'}/{p.name}")
    remote_tars = [f"{s3_bucket}/tars/{t.name}" for t in tars]
    cfg = tiny_cfg("steps=8", "checkpoint_every=2", "keep_checkpoints=2", "data.workers=2")
    local = train(TrainJob(cfg, [str(t) for t in tars], cache, tmp_path / "local", progress=False))

    out = f"{s3_bucket}/runs/r1"
    monkeypatch.setenv("L2C_STAGING_DIR", str(tmp_path / "machine-a"))
    part = train(TrainJob(cfg, remote_tars, f"{s3_bucket}/cache", out, max_steps=5, progress=False))
    assert part["step"] == 5 and part["run_dir"] == out and part["export"] == f"{out}/export"
    run = Store(out)
    stored = sorted(f for f in run.fs.find(run.path("checkpoints")))  # pruned in the store too
    assert [f.split("/checkpoints/")[1] for f in stored] == [
        f"step-0000000{s}/{f}" for s in (4, 5) for f in ("checkpoint.json", "model.safetensors", "state.pt")]
    assert [json.loads(x)["step"] for x in run.read_text("metrics.jsonl").splitlines()] == [1, 2, 3, 4, 5]
    assert not run.exists("pairing-index/index.json")  # derived files stay local

    monkeypatch.setenv("L2C_STAGING_DIR", str(tmp_path / "machine-b"))
    with pytest.raises(ResumeError, match="--no-resume"):  # another machine sees the store's checkpoints
        train(TrainJob(cfg, remote_tars, f"{s3_bucket}/cache", out, resume=False, progress=False))
    done = train(TrainJob(cfg, remote_tars, f"{s3_bucket}/cache", out, progress=False))
    assert done["finished"] and done["resumed_from"] == 5 and done["skips"] == dict.fromkeys(done["skips"], 0)
    remote_rows = [json.loads(x) for x in run.read_text("metrics.jsonl").splitlines()]
    ma = metrics(tmp_path / "local")
    assert [r["data_digest"] for r in remote_rows] == [r["data_digest"] for r in ma]
    np.testing.assert_allclose([r["loss"] for r in remote_rows], [r["loss"] for r in ma], rtol=1e-5, atol=1e-6)
    assert json.loads(run.read_text("summary.json"))["step"] == local["step"] == 8
    wa = load_exported(tmp_path / "local").state_dict()
    wb = load_exported(out).state_dict()  # fetched from the bucket
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

    # eval reads the model, the images and the cache from the bucket and gets the local figures
    def evaluate(model, images, cache_dir, dest):
        args = ["eval-retrieval", "--model", str(model), "--text-cache", str(cache_dir), "--out", str(dest)]
        assert main([*args, *[a for t in images for a in ("--images", str(t))]]) == 0
        return json.loads((dest / "eval.json").read_text())

    ea = evaluate(tmp_path / "local", tars, cache, tmp_path / "eval-local")
    eb = evaluate(out, remote_tars, f"{s3_bucket}/cache", tmp_path / "eval-s3")
    assert ea["n_images"] == eb["n_images"] == 96
    assert ea["image_to_text"] == eb["image_to_text"] and ea["text_to_image"] == eb["text_to_image"]


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(classes, tmp_path):
    """A process killed mid-run (SIGKILL) resumes from its last checkpoint and ends like an uninterrupted run."""
    tars, _, _, cache = classes
    over = [f"model.vision.config={json.dumps(TINY_VIT)}", "model.embed_dim=24", "model.adapter.n_blocks=2",
            "batch_size=16", "steps=30", "optim.lr=2e-3", "optim.warmup_steps=2", "precision=fp32", "log_every=1",
            "checkpoint_every=5", "data.workers=1", "data.shuffle_buffer=32", "torch_threads=1"]
    images = [a for t in tars for a in ("--images", str(t))]

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "l2c.cli", "train-vision", *images, "--text-cache", str(cache),
                "--out", str(out), "--no-progress", *extra, *over]

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd(tmp_path / "full"), check=True, env=env, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "step-00000010").exists():  # renamed into place when whole
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()
    subprocess.run(cmd(run, "--resume"), check=True, env=env, capture_output=True)
    a, b = metrics(tmp_path / "full"), metrics(run)
    assert [r["step"] for r in b] == list(range(1, 31))  # lines written after the checkpoint were replaced
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ray_train_two_workers(classes, ray_local, tmp_path):
    """Two Ray Train workers (DDP over gloo) split the data without overlap and train one model."""
    tars, _, _, cache = classes
    from l2c.trainer.vision.loop import train_on_ray

    cfg = tiny_cfg("steps=6", "batch_size=8", "checkpoint_every=3")
    summary = train_on_ray(TrainJob(cfg, [str(t) for t in tars], cache, tmp_path / "run", workers=2))
    assert summary["world_size"] == 2 and summary["finished"] and summary["samples_seen"] == 6 * 8 * 2
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt["world_size"] == 2 and len(ckpt["data"]) == 2
    assert ckpt["data"][0]["digest"] != ckpt["data"][1]["digest"]  # each rank reads its own shards
    assert load_exported(tmp_path / "run").meta.embed_dim == 24


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_max_steps_below_one_is_refused(classes, tmp_path, capsys, steps):
    tars, _, _, cache = classes
    rc = main(["train-vision", "--images", str(tars[0]), "--text-cache", str(cache), "--out", str(tmp_path / "r"),
               "--max-steps", steps, f"model.vision.config={json.dumps(TINY_VIT)}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"l2c: error: --max-steps {steps}: must be at least 1 (leave it out to run the schedule)"]
    assert not (tmp_path / "r").exists()


def test_cache_dim_disagreeing_with_its_vectors_is_refused_before_training(classes, tmp_path, capsys):
    import shutil

    from l2c.cache import Manifest

    tars, _, _, cache = classes
    bad = tmp_path / "cache"
    shutil.copytree(cache, bad)
    m = Manifest.load(bad)
    true_dim = m.settings["dim"]
    m.settings["dim"] = true_dim + 1
    m.save(bad)
    rc = main(["train-vision", "--images", str(tars[0]), "--text-cache", str(bad), "--out", str(tmp_path / "r"),
               f"model.vision.config={json.dumps(TINY_VIT)}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"holds {true_dim}-dim vectors but the manifest says dim={true_dim + 1}" in err[0]
    assert not (tmp_path / "r" / "checkpoints").exists()


def _train_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """train-vision in its own process, bounded in time: a hang fails the test instead of stalling it."""
    return subprocess.run([sys.executable, "-m", "l2c.cli", "train-vision", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


TINY_ARGS = [f"model.vision.config={json.dumps(TINY_VIT)}", "model.embed_dim=24", "model.adapter.n_blocks=2",
             "precision=fp32", "log_every=1", "checkpoint_every=100", "torch_threads=1"]  # fmt: skip


def test_worker_share_below_batch_size_trains(tmp_path):
    """One 20-image tar, 2 data workers (10 images each), batch 16: short shares carry into the next epoch."""
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=20, n_classes=4, seed=3)
    cache = class_cache_for(tars, labels, tmp_path / "cache", class_vectors(4, DIM))
    out = tmp_path / "run"
    proc = _train_cli(["--images", tars[0], "--text-cache", cache, "--out", out, "batch_size=16", "steps=3",
                       "data.workers=2", "data.shuffle_buffer=0", *TINY_ARGS])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["samples_seen"] == 48 and summary["skips"]["missing_vector"] == 0


def test_no_key_matching_the_cache_stops_with_one_line(tmp_path):
    tars, labels = write_class_shards(tmp_path / "tars", n_shards=1, per_shard=20, n_classes=4, seed=3)
    other, other_labels = write_class_shards(tmp_path / "other", n_shards=1, per_shard=20, n_classes=4, seed=9,
                                             prefix="other")  # fmt: skip
    cache = class_cache_for(other, other_labels, tmp_path / "cache", class_vectors(4, DIM))
    t0 = time.monotonic()
    proc = _train_cli(["--images", tars[0], "--text-cache", cache, "--out", tmp_path / "run", "batch_size=8",
                       "steps=3", "data.workers=2", "data.pairing=join", *TINY_ARGS])  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.startswith("l2c: error")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "no usable image-caption pair" in err[0] and "missing_vector: 10" in err[0] and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 200


def test_sigterm_leaves_no_data_workers(classes, tmp_path):
    tars, _, _, cache = classes
    proc = subprocess.Popen([sys.executable, "-m", "l2c.cli", "train-vision", "--no-progress", "--images", str(tars[0]),
                             "--text-cache", str(cache), "--out", str(tmp_path / "run"), "batch_size=8", "steps=100000",
                             "data.workers=2", *TINY_ARGS], cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.5)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 2  # the two DataLoader workers
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(2)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]  # fmt: skip
    assert proc.returncode != 0 and alive == []


def test_a_second_run_into_the_same_out_is_refused_at_once(classes, tmp_path, refused):
    tars, _, _, cache = classes
    args = ["train-vision", "--no-progress", "--images", str(tars[0]), "--text-cache", str(cache), "--out",
            str(tmp_path / "run"), "batch_size=8", "steps=100000", "data.workers=0", *TINY_ARGS]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "l2c.cli", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / ".l2c-lock.json"
    deadline = time.monotonic() + 180
    while not lock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.2)
    t0 = time.monotonic()
    refused(args, rf"in use by another train-vision job \(pid {proc.pid} ")
    assert time.monotonic() - t0 < 60  # refused before any work, not after a step
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not lock.exists()  # released on the way out
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or all(
        r["step"] >= 1 for r in metrics(tmp_path / "run"))  # one writer: no line twice  # fmt: skip


def test_non_finite_vectors_in_a_shard_stop_the_run_before_a_step(classes, tmp_path, refused):
    tars, labels, vecs, _ = classes
    bad = vecs.copy()
    bad[2, 5] = np.nan  # every image of class 2 gets a NaN vector
    cache = class_cache_for(tars, labels, tmp_path / "nan-cache", bad)
    refused(["train-vision", "--no-progress", "--images", str(tars[0]), "--text-cache", str(cache), "--out",
             str(tmp_path / "run"), "data.workers=0", *TINY_ARGS],
            r"shard-000000: \d+ vector\(s\) are not finite \(first: key 'shard000_\d+_s0', field 'txt'\)")  # fmt: skip
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def test_a_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(classes, tmp_path, capsys):
    tars, _, _, cache = classes
    rc = main(["train-vision", "--no-progress", "--images", str(tars[0]), "--text-cache", str(cache), "--out",
               str(tmp_path / "run"), *TINY_ARGS, "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0",
               "checkpoint_every=1", "steps=50"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and re.search(r"step \d+: (the loss is nan|the gradient of \S+ is not finite)", err), err
    assert sum(line.startswith("l2c: error:") for line in err.splitlines()) == 1 and "Traceback" not in err
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in state["weights"].values())
    assert not (tmp_path / "run" / "export").exists()  # no NaN is ever exported


def test_likely_misuse_is_warned(classes, tmp_path, caplog):
    """A batch larger than the data (each image several times in a batch) and a schedule that sees part of the data."""
    tars, _, _, cache = classes
    with caplog.at_level("WARNING", logger="l2c"):
        train(TrainJob(tiny_cfg("batch_size=64", "steps=1", "optim.warmup_steps=0"), [str(tars[0])], cache, tmp_path / "big", progress=False))
    assert re.search(r"a batch holds 32 distinct images \(each about 2.0 times\)", caplog.text), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="l2c"):
        train(TrainJob(tiny_cfg("batch_size=8", "steps=2", "optim.warmup_steps=0"), [str(t) for t in tars], cache, tmp_path / "short",
                       progress=False))  # fmt: skip
    assert "16 samples, fewer than the ~96 images" in caplog.text and "distinct images" not in caplog.text
    caplog.clear()  # batches across an epoch's end hold a few copies: no misuse, no warning
    with caplog.at_level("WARNING", logger="l2c"):
        train(TrainJob(tiny_cfg("batch_size=20", "steps=4", "optim.warmup_steps=0", "data.workers=1"), [str(tars[0])],
                       cache, tmp_path / "wrap", progress=False))  # fmt: skip
    assert "distinct images" not in caplog.text


def test_resume_of_a_run_from_before_a_config_key_existed():
    """A key the saved config lacks counts as its default: resuming with the default passes, another value is refused."""
    from l2c.config import to_dict
    from l2c.trainer.resume import check_changes

    now = to_dict(tiny_cfg())
    saved = json.loads(json.dumps(now))
    del saved["optim"]["head_lr_mult"]  # as if the run were made before the key existed
    assert check_changes(saved, now, ("steps",), "run r", to_dict(TrainConfig())) == {}
    now["optim"]["head_lr_mult"] = 2.0
    with pytest.raises(ResumeError, match=r"optim.head_lr_mult: run 1.0, now 2.0"):
        check_changes(saved, now, ("steps",), "run r", to_dict(TrainConfig()))


LOSS_OPTIONS = {
    "all-captions": ("loss.positives=all",),
    "hard-negatives": ("loss.hard_negatives=2",),
    "nested-dims": ("model.nested_dims=[8,16]",),
    "all-three-siglip-join": ("loss.kind=siglip", "loss.positives=all", "loss.hard_negatives=2", "model.nested_dims=[8]",
                              "data.pairing=join"),
}  # fmt: skip


@pytest.mark.parametrize("option", list(LOSS_OPTIONS))
def test_resume_with_each_loss_option_equals_uninterrupted(classes, tmp_path, option):
    """Every caption in the step, mined negatives, nested dims (and all three with SigLIP and join pairing): a run
    stopped and resumed gives the losses and weights of one that was not; the option changes the losses."""
    tars, _, _, cache = classes
    if not (Path(cache) / "negatives" / "negatives.json").exists():
        assert main(["mine-negatives", "--text-cache", str(cache), "--k", "4", "--no-progress"]) == 0
    images = [str(t) for t in tars]
    cfg = tiny_cfg("steps=8", "checkpoint_every=3", "data.workers=2", *LOSS_OPTIONS[option])
    train(TrainJob(cfg, images, cache, tmp_path / "full", progress=False))
    part = train(TrainJob(cfg, images, cache, tmp_path / "part", max_steps=4, progress=False))
    assert part["step"] == 4
    resumed = train(TrainJob(cfg, images, cache, tmp_path / "part", resume=True, progress=False))
    assert resumed["finished"] and resumed["resumed_from"] == 4
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)
    wa, wb = load_exported(tmp_path / "full").state_dict(), load_exported(tmp_path / "part").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    plain = [o for o in LOSS_OPTIONS[option] if o.startswith(("data.", "loss.kind"))]
    train(TrainJob(tiny_cfg("steps=3", "data.workers=2", *plain), images, cache, tmp_path / "plain", progress=False))
    assert metrics(tmp_path / "plain")[0]["loss"] != pytest.approx(a[0]["loss"], rel=1e-4)
    loaded = load_exported(tmp_path / "full")
    nested = loaded.meta.nested_dims
    assert nested == ([8, 16, 24] if option == "nested-dims" else [8, 24] if "siglip" in option else [])
    assert loaded.nested_dims == nested  # the loaded module carries them too (a re-export keeps them)
