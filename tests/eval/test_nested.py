"""Recall at each nested dim: eval-retrieval of a model exported with `nested_dims` reports every dim, each
equal to a reference computed on the features cut and re-normalised by hand; a model without them reports none."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_reference import features_by_hand, reference_recall, write_shards

from l2c.cli import main

TEXT_DIM = 16


def _export(run_dir, settings, nested):
    from l2c.teacher import TeacherSpec
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.export import export_model
    from l2c.trainer.vision.model import L2CModel
    from l2c.trainer.vision.tower import build_vision_tower
    from tests.trainer.vision.train_helpers import TINY_VIT

    torch.manual_seed(0)
    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_VIT)))
    model = L2CModel(tower, spec, TEXT_DIM, 24, n_blocks=1, expansion=2, nested_dims=nested).eval()
    return export_model(model, run_dir / "export", proc, TeacherSpec.from_dict(settings), settings["fields"])


def test_eval_retrieval_reports_recall_at_each_nested_dim(make_cache, tmp_path):
    samples = write_shards(tmp_path / "shards", n_shards=2, per_shard=12)
    settings = {"model": "test-encoder", "dim": TEXT_DIM, "fields": ["txt"], "model_fingerprint": "f00d",
                "store_dtype": "float32"}  # fmt: skip
    keys = [s["key"] for s in samples]
    t_keys = keys * 2
    vecs = np.random.default_rng(1).standard_normal((len(t_keys), TEXT_DIM)).astype(np.float32)
    cache = make_cache(t_keys, ["txt"] * len(keys) + ["txt2"] * len(keys), vecs, fingerprint="f00d")
    images = str(tmp_path / "shards" / "shard-{00000..00001}.tar")
    for nested in ([4, 12, 24], []):
        run = tmp_path / f"run{len(nested)}"
        _export(run, settings, nested)
        out = tmp_path / f"out{len(nested)}"
        assert main(["eval-retrieval", "--model", str(run), "--images", images, "--text-cache", str(cache),
                     "--out", str(out), "--backend", "faiss"]) == 0  # fmt: skip
        got = json.loads((out / "eval.json").read_text())
        if not nested:
            assert "nested" not in got
            continue
        assert list(got["nested"]) == ["4", "12", "24"]
        assert got["nested"]["24"]["image_to_text"] == got["image_to_text"]  # the full dim is the main figure
        m, _, img = features_by_hand(run, sorted((tmp_path / "shards").glob("*.tar")))
        with torch.no_grad():
            txt = m.encode_text(torch.from_numpy(vecs)).numpy()
        text_image = np.array([keys.index(k) for k in t_keys])
        for d in (4, 12):
            a = img[:, :d] / np.linalg.norm(img[:, :d], axis=1, keepdims=True)
            b = txt[:, :d] / np.linalg.norm(txt[:, :d], axis=1, keepdims=True)
            i2t, t2i = reference_recall(a, b, text_image, [1, 5, 10])
            assert got["nested"][str(d)]["image_to_text"] == pytest.approx(i2t, abs=1e-4)
            assert got["nested"][str(d)]["text_to_image"] == pytest.approx(t2i, abs=1e-4)
