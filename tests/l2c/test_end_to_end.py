"""The whole job through the CLI, as a user types it: real COCO photos, and the demo driver at a small size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2c.cache import TextCache
from l2c.cli import main

TINY_VIT = ('model.vision.config={model_type: vit, hidden_size: 48, num_hidden_layers: 2, num_attention_heads: 2, '
            'intermediate_size: 96, image_size: 64, patch_size: 16}')


@pytest.mark.slow
def test_real_photos_make_shards_embed_train_eval(shared_data, ray_local, tmp_path):
    coco = shared_data / "coco_mini_val2017"
    n = sum(1 for _ in (coco / "captions.jsonl").open())
    shards = tmp_path / "shards"
    assert main(["make-shards", str(coco), "--captions", str(coco / "captions.jsonl"), "--out", str(shards),
                 "--shard-size", "64", "--max-side", "160"]) == 0
    tars = sorted(str(p) for p in shards.glob("shard-*.tar"))
    assert len(tars) == 3
    cache = tmp_path / "cache"
    assert main(["embed-captions", *tars, "--out", str(cache), "--model", "minilm", "--text-field", "txt",
                 "--text-field", "json:long_caption", "--no-progress"]) == 0
    keys, fields, _ = TextCache(cache).load()
    assert len(keys) == 2 * n and set(fields) == {"txt", "json:long_caption"}
    run = tmp_path / "run"
    images = [a for t in tars for a in ("--images", t)]
    assert main(["train-vision", *images, "--text-cache", str(cache), "--out", str(run), "--no-progress",
                 TINY_VIT, "model.embed_dim=64", "batch_size=32", "steps=6", "optim.warmup_steps=1",
                 "precision=fp32", "data.workers=1", "log_every=1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["skips"]["corrupt_image"] == 0 and summary["skips"]["missing_vector"] == 0
    out = tmp_path / "eval"
    assert main(["eval-retrieval", "--model", str(run), *images, "--text-cache", str(cache), "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_images"] == n and result["n_texts"] == 2 * n
    for direction in ("image_to_text", "text_to_image"):
        r = result[direction]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
    assert (out / "recall_curves.png").stat().st_size > 5000


@pytest.mark.slow
def test_demo_driver_small(tmp_path):
    """`make demo` at a small size: every stage done, figures in eval.json, a rerun skips every stage."""
    from l2c.apps.demo import main as demo

    out = tmp_path / "demo"
    args = ["--out", str(out), "--n", "256", "--val-n", "64", "--no-progress", "steps=12", "batch_size=32",
            "optim.warmup_steps=2", "checkpoint_every=6"]
    assert demo(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["ok"] and {v["status"] for v in result["stages"].values()} == {"done"}
    assert result["retrieval"]["n_images"] == 64 and result["train"]["step"] == 12
    assert 0 <= result["zeroshot"]["top1"] <= result["zeroshot"]["top5"] <= 100
    assert (out / "report.md").exists() and (out / "data" / "preview.png").exists()
    assert demo(args) == 0
    again = json.loads((out / "eval.json").read_text())
    assert {v["status"] for v in again["stages"].values()} == {"skipped"}
    assert again["retrieval"] == result["retrieval"]


def _photo_subset(shared: Path, dest: Path, n: dict[str, int]) -> Path:
    """The first photos of each Flickr8k split, in the shared layout (`captions.jsonl` + JPEGs)."""
    for split, count in n.items():
        src, out = shared / f"flickr8k_{split}_photos", dest / f"flickr8k_{split}_photos"
        out.mkdir(parents=True)
        lines = (src / "captions.jsonl").read_text().splitlines()[:count]
        for line in lines:
            name = json.loads(line)["file_name"]
            (out / name).symlink_to(src / name)
        (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return dest


@pytest.mark.slow
def test_photo_demo_driver_small(shared_data, tmp_path):
    """`make demo-photos` on 96 train and 32 dev photos: every stage, all five captions per dev photo, the
    shuffled-pairs control, the same eval.json schema as `make demo`; a rerun skips every stage."""
    from l2c.apps.demo_photos import main as demo_photos

    data = _photo_subset(shared_data, tmp_path / "photos", {"train": 96, "dev": 32})
    out = tmp_path / "demo-photos"
    args = ["--out", str(out), "--data", str(data), "--no-progress", "--control-steps", "3", "steps=6",
            "batch_size=16", "optim.warmup_steps=1", "checkpoint_every=3", "data.workers=0"]
    assert demo_photos(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["ok"] and {v["status"] for v in result["stages"].values()} == {"done"}
    assert {"ok", "settings", "stages", "seconds", "train", "retrieval", "zeroshot", "chance"} <= set(result)
    assert result["retrieval"]["n_images"] == 32 and result["retrieval"]["n_texts"] == 5 * 32
    assert result["control"]["n_texts"] == 5 * 32 and result["train"]["step"] == 6
    assert json.loads((out / "control" / "summary.json").read_text())["step"] == 3
    assert result["chance"] == {"image_to_text_R@1": 3.125, "text_to_image_R@1": 3.125}
    assert demo_photos(args) == 0
    again = json.loads((out / "eval.json").read_text())
    assert {v["status"] for v in again["stages"].values()} == {"skipped"}
    assert again["retrieval"] == result["retrieval"]


def test_photo_demo_without_photos_says_where(tmp_path, capsys):
    from l2c.apps.demo_photos import main as demo_photos

    assert demo_photos(["--out", str(tmp_path / "o"), "--data", str(tmp_path / "none"), "--no-progress"]) == 1
    result = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert result["stages"]["shards"]["status"] == "failed" and "--data" in result["stages"]["shards"]["detail"]
    assert {result["stages"][k]["status"] for k in ("embed", "train", "retrieval")} == {"blocked"}
