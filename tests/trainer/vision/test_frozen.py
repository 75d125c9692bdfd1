"""train-vision with a frozen tower from two caches (--image-cache): the same losses as training on the tars
with the tower frozen, checkpoints and resume, the export through eval, and refusals of caches that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from l2c.cli import main
from l2c.config import load_config
from l2c.data.images import decode_image
from l2c.data.shards import read_tar
from l2c.image_cache import ImageCache
from l2c.trainer.job import TrainJob
from l2c.trainer.vision.config import TrainConfig
from l2c.trainer.vision.export import load_exported
from l2c.trainer.vision.loop import train
from tests.trainer.vision.train_helpers import TINY_VIT, class_vectors, image_tars, save_tower, write_cache

DIM = 16


@pytest.fixture(scope="module")
def caches(tmp_path_factory, ray_local):
    """3 tars (one JPEG cut short, one sample without image), an aligned text cache of two fields lacking one
    key's vectors, a tiny tower on disk and its image cache from `l2c embed-images`."""
    root = tmp_path_factory.mktemp("frozen")
    tars = image_tars(root / "tars", n_shards=3, per_shard=12)
    vecs = class_vectors(4, DIM)
    rng = np.random.default_rng(3)
    shards = {}
    for tar in tars:
        rows = [(s.key, f, vecs[int(s.key[-3:]) % 4] + 0.05 * rng.standard_normal(DIM).astype(np.float32))
                for s in read_tar(str(tar)) if s.key != "s2_005" for f in ("txt", "json:long_caption")]  # fmt: skip
        shards[tar.stem] = (str(tar), rows)
    text = write_cache(root / "text", shards, DIM, ["txt", "json:long_caption"])
    tower = save_tower(root / "tower", seed=0)
    assert main(["embed-images", str(root / "tars"), "--model", str(tower), "--out", str(root / "images"),
                 "--no-progress", "--batch-size", "5"]) == 0  # fmt: skip
    return root, tars, text, tower, root / "images"


def frozen_cfg(tower: Path, *overrides: str) -> TrainConfig:
    base = [f"model.vision.pretrained={tower}", "model.vision.frozen=true", "model.embed_dim=24",
            "model.adapter.n_blocks=2", "batch_size=8", "steps=14", "optim.lr=2e-3", "optim.warmup_steps=2",
            "precision=fp32", "log_every=1", "checkpoint_every=5", "data.workers=0", "data.shuffle_buffer=12",
            "data.random_crop_scale=[1,1]", "torch_threads=1"]  # fmt: skip
    return load_config(TrainConfig, None, base + list(overrides))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_both(caches, tmp_path, *overrides):
    root, tars, text, tower, images = caches
    cfg = frozen_cfg(tower, *overrides)
    online = train(TrainJob(cfg, [str(t) for t in tars], text, tmp_path / "online", progress=False))
    cached = train(TrainJob(cfg, None, text, tmp_path / "cached", progress=False, image_cache=str(images)))
    return online, cached, metrics(tmp_path / "online"), metrics(tmp_path / "cached")


@pytest.mark.parametrize(
    "overrides", [(), ("data.workers=2", "data.pairing=join", "model.vision.head_layers=3"),
                  ("loss.positives=all", "model.nested_dims=[8]")]  # every caption in the step, nested dims
)
def test_training_from_caches_equals_online_frozen(caches, tmp_path, overrides):
    online, cached, a, b = run_both(caches, tmp_path, *overrides)
    assert len(a) == len(b) == 14
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=0, atol=1e-5)
    assert [r["data_digest"] for r in a] == [r["data_digest"] for r in b]  # the same keys in the same batches
    assert cached["skips"] == online["skips"]
    # the planted samples are counted the same way, from the cache's rejects (per epoch streamed)
    assert cached["skips"]["corrupt_image"] >= 1 and cached["skips"]["missing_image"] >= 1
    assert cached["skips"]["missing_vector"] >= 1
    # a frozen tower stays as it was: both exports hold the tower unchanged
    t0 = load_exported(tmp_path / "online").tower.state_dict()
    t1 = load_exported(tmp_path / "cached").tower.state_dict()
    assert all(torch.equal(t0[k], t1[k]) for k in t0)
    assert a[-1]["loss"] < a[0]["loss"]


def test_resume_from_caches_continues_exactly(caches, tmp_path):
    root, tars, text, tower, images = caches
    cfg = frozen_cfg(tower)
    whole = tmp_path / "whole"
    train(TrainJob(cfg, None, text, whole, progress=False, image_cache=str(images)))
    part = tmp_path / "part"
    s = train(TrainJob(cfg, None, text, part, progress=False, image_cache=str(images), max_steps=6))
    assert s["stopped_by"] == "max_steps" and s["step"] == 6
    s = train(TrainJob(cfg, None, text, part, progress=False, image_cache=str(images), resume=True))
    assert s["resumed_from"] == 6 and s["finished"]
    np.testing.assert_allclose(
        [r["loss"] for r in metrics(part)], [r["loss"] for r in metrics(whole)], atol=1e-6
    )


def test_caches_that_do_not_fit_are_refused(caches, tmp_path, refused):
    root, tars, text, tower, images = caches
    base = ["train-vision", "--text-cache", text, "--out", tmp_path / "run", "--image-cache", images, "--no-progress",
            "model.vision.frozen=true", "steps=2", "batch_size=4", "data.workers=0"]  # fmt: skip
    other = save_tower(tmp_path / "other", seed=1)
    refused(
        [*base, f"model.vision.pretrained={other}"], r"was made with tower .* not model.vision.pretrained="
    )
    refused([*base[:-4], "steps=2", f"model.vision.pretrained={tower}"], "set model.vision.frozen=true")
    refused([*base, f"model.vision.config={json.dumps(TINY_VIT)}"], "needs model.vision.pretrained=TOWER_DIR")
    refused(
        [*base, f"model.vision.pretrained={tower}", "model.vision.feature=both"], "holds no patch-token means"
    )

    # dims that disagree: a shard of other-width features, or a manifest that says another dim
    bad = tmp_path / "bad-dim"
    shutil.copytree(images, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["settings"]["dim"] = 48
    (bad / "manifest.json").write_text(json.dumps(m))
    refused([*base[:6], bad, *base[7:], f"model.vision.pretrained={tower}"],
            "holds 48-dim features but the tower .* gives 32-dim")  # fmt: skip
    from l2c.cache import write_shard_file
    from l2c.image_cache import build_image_table

    mixed = tmp_path / "mixed"
    shutil.copytree(images, mixed)
    m = json.loads((mixed / "manifest.json").read_text())
    rows, sha = write_shard_file(
        mixed, "img-000.parquet", build_image_table(["a"], np.zeros((1, 8)), None, "float32")
    )
    m["shards"]["img-000"].update(rows=rows, sha256=sha)
    (mixed / "manifest.json").write_text(json.dumps(m))
    refused(
        [*base[:6], mixed, *base[7:], f"model.vision.pretrained={tower}"], "shard img-000 holds 8-dim vectors"
    )

    # keys that do not match the text cache: a text cache of other tars
    rows = [(f"other_{i}", "txt", np.ones(DIM, np.float32)) for i in range(5)]
    other_text = write_cache(tmp_path / "other-text", {"img-000": ("x.tar", rows)}, DIM, ["txt"])
    refused(["train-vision", "--text-cache", other_text, *base[3:], f"model.vision.pretrained={tower}"],
            "no key of image cache .* is in text cache")  # fmt: skip
    # --images naming a tar the image cache was not made from
    refused(
        [*base, f"model.vision.pretrained={tower}", "--images", root / "tars" / "x.tar"], "does not exist"
    )
    extra = image_tars(tmp_path / "more", n_shards=1, per_shard=2, bad=False)[0].rename(
        tmp_path / "more" / "new.tar"
    )
    refused(
        [*base, f"model.vision.pretrained={tower}", "--images", extra],
        "has no shard for 1 of the --images tars",
    )
    refused(
        ["train-vision", "--text-cache", text, "--out", tmp_path / "r2", f"model.vision.pretrained={tower}"],
        "needs --images .* or --image-cache",
    )


def test_mlp_head_from_real_caches_exports_a_model_eval_runs(caches, tmp_path, minilm_path):
    """MiniLM captions (`embed-captions`), tower features (`embed-images`), a 4-layer head trained from the two
    caches through the CLI; the export encodes images through the tower and the head, and both evals run on it."""
    root, tars, _, tower, images = caches
    text = tmp_path / "minilm-cache"
    assert main(["embed-captions", str(root / "tars"), "--out", str(text), "--model", str(minilm_path),
                 "-f", "txt", "--no-progress"]) == 0  # fmt: skip
    run = tmp_path / "run"
    assert main(["train-vision", "--image-cache", str(images), "--text-cache", str(text), "--out", str(run),
                 "--no-progress", f"model.vision.pretrained={tower}", "model.vision.frozen=true",
                 "model.vision.head_layers=4", "model.vision.head_hidden=64", "model.embed_dim=32", "batch_size=8",
                 "steps=30", "optim.lr=2e-3", "optim.warmup_steps=2", "precision=fp32", "log_every=5",
                 "checkpoint_every=10", "data.workers=0", "data.random_crop_scale=[1,1]", "torch_threads=1"]) == 0  # fmt: skip
    rows = metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"]
    m = load_exported(run)
    assert m.meta.image_head == {"feature": "pooled", "layers": 4, "hidden": 64} and m.meta.frozen_tower
    assert (
        len([k for k in m.head_state_dict() if k.startswith("visual_proj.") and k.endswith(".weight")]) == 7
    )

    # the export: an image through the tower, then the head == the head on the image's cached feature
    cache = ImageCache(images)
    keys, feats = cache.features("img-000")
    imgs = {s.key: decode_image(s["jpg"], target=32) for s in read_tar(str(tars[0]))}
    with torch.no_grad():
        online = m.encode_image(torch.stack([m.preprocess(imgs[k]) for k in keys]))
        from_cache = m.encode_features(torch.tensor(feats))
    np.testing.assert_allclose(online.numpy(), from_cache.numpy(), atol=1e-5)

    out = tmp_path / "eval"
    assert main(["eval-retrieval", "--model", str(run), "--images", str(root / "tars"), "--text-cache", str(text),
                 "--k", "1,5", "--allow-missing", "--out", str(out / "retrieval")]) == 0  # fmt: skip
    got = json.loads((out / "retrieval" / "eval.json").read_text())
    assert got["n_images"] == 34 and set(got["image_to_text"]) == {"R@1", "R@5"}
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"class {i}\n" for i in range(4)))
    assert main(["eval-zeroshot", "--model", str(run), "--images", str(root / "tars"), "--classes", str(classes),
                 "--out", str(out / "zeroshot")]) == 0  # fmt: skip
    z = json.loads((out / "zeroshot" / "eval.json").read_text())
    assert z["n_images"] == 34
