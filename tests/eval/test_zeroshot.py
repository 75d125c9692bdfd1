"""Zero-shot classification: metrics on planted predictions, and the command end to end with real MiniLM prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_reference import KINDS, export_tiny_model, features_by_hand, write_shards

from l2c.cli import main
from l2c.eval.errors import EvalError
from l2c.eval.search import l2_normalize
from l2c.eval.zeroshot import label_indices, load_templates, zeroshot_metrics


def test_zeroshot_metrics_hand_checked():
    classes = ["cat", "dog", "bird"]
    classifier = np.eye(3, dtype=np.float32)
    # image i scores highest on its planted prediction, second highest on the next class
    preds = [0, 0, 1, 1, 1, 2, 0, 2]
    labels = np.array([0, 0, 1, 1, 0, 2, 2, 1])
    feats = np.array([np.eye(3)[p] * 0.9 + np.eye(3)[(p + 1) % 3] * 0.1 for p in preds], np.float32)
    res = zeroshot_metrics(feats, labels, classifier, classes, top_confused=3)
    assert res["top1"] == pytest.approx(100 * 5 / 8)
    assert res["top5"] is None  # 3 classes: top-5 would be 100% for every image, so it is not reported
    cm = np.array(res["confusion_matrix"])
    assert cm.sum() == 8 and cm.tolist() == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert res["per_class_accuracy"] == pytest.approx({"cat": 200 / 3, "dog": 200 / 3, "bird": 50.0})
    assert [(p["true"], p["predicted"], p["count"]) for p in res["most_confused"]] == [
        ("cat", "dog", 1),
        ("dog", "bird", 1),
        ("bird", "cat", 1),
    ]
    assert res["most_confused"][2]["percent"] == pytest.approx(50.0)


def test_labels_and_templates_are_checked(tmp_path):
    idx, missing = label_indices(["dog", None, "0", 2, ""], ["cat", "dog", "bird"], "json:label")
    assert idx.tolist() == [1, -1, 0, 2, -1] and missing == [1, 4]
    with pytest.raises(EvalError, match=r"not in the class list: \{'cow': 2\}"):
        label_indices(["cow", "cat", "cow"], ["cat", "dog"], "json:label")
    with pytest.raises(EvalError, match="not in the class list"):
        label_indices([5], ["cat", "dog"], "cls")
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}.\n# comment\na photo\n")
    with pytest.raises(EvalError, match="exactly one {}"):
        load_templates(bad)
    assert load_templates(None) == ["a photo of a {}."]


@pytest.fixture(scope="module")
def minilm_model(tmp_path_factory, minilm_path):
    """A tiny exported model whose text cache would have been made with the packaged MiniLM."""
    from l2c.pipeline.embed_job import EmbedConfig, resolve_settings

    root = tmp_path_factory.mktemp("zeroshot")
    settings, _ = resolve_settings(EmbedConfig(sources=[], out=str(root / "c"), model="minilm"), False)
    export_tiny_model(root / "run", settings["dim"], settings, seed=3)
    return root, settings


def test_eval_zeroshot_matches_independent_computation(minilm_model, minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    root, _ = minilm_model
    no_label = {"s0-0004": {"json": json.dumps({"long_caption": "unlabelled"}).encode()}}
    samples = write_shards(tmp_path / "shards", n_shards=2, per_shard=12, extra=no_label)
    (tmp_path / "classes.txt").write_text("\n".join(KINDS) + "\n")
    templates = ["a photo of a {}.", "a drawing of a {}.", "a {} shape."]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "out"
    rc = main(["eval-zeroshot", "--model", str(root / "run"), "--images", str(tmp_path / "shards"),
               "--classes", str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"),
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    got = json.loads((out / "eval.json").read_text())
    assert got["n_images"] == 23 and got["n_skipped"] == 1 and got["skipped"]["no_label"] == ["s0-0004"]
    assert (out / "confusion_matrix.png").stat().st_size > 1000

    # the same classifier built by hand: sentence-transformers MiniLM, the adapter, normalise-mean-normalise
    m, keys, feats = features_by_hand(root / "run", sorted((tmp_path / "shards").glob("*.tar")))
    st = SentenceTransformer(str(minilm_path), device="cpu")
    prompts = [t.format(c) for c in KINDS for t in templates]
    vecs = st.encode(prompts, normalize_embeddings=True)
    with torch.no_grad():
        emb = m.encode_text(torch.from_numpy(vecs)).numpy().reshape(3, 3, -1)
    classifier = l2_normalize(l2_normalize(emb).mean(axis=1))
    label_of = {s["key"]: KINDS.index(s["label"]) for s in samples}
    keep = [i for i, k in enumerate(keys) if k != "s0-0004"]
    pred = (feats[keep] @ classifier.T).argmax(axis=1)
    labels = np.array([label_of[keys[i]] for i in keep])
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (labels, pred), 1)
    assert got["confusion_matrix"] == cm.tolist()
    assert got["top1"] == pytest.approx(100 * np.mean(pred == labels))


def test_eval_zeroshot_bad_inputs(refused, minilm_model, tmp_path):
    root, _ = minilm_model
    write_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    (tmp_path / "classes.txt").write_text("circle\nsquare\n")
    args = ["eval-zeroshot", "--model", str(root / "run"), "--images", str(tmp_path / "shards"), "--classes"]
    refused([*args, str(tmp_path / "classes.txt")], r"labels \(json:label\) that are not in the class list")
    (tmp_path / "dup.txt").write_text("circle\nsquare\ncircle\n")
    refused([*args, str(tmp_path / "dup.txt")], "more than once")
    (tmp_path / "all.txt").write_text("\n".join(KINDS))
    refused([*args, str(tmp_path / "all.txt"), "--label-field", "json:kind"], r"none of the 4 image\(s\) has a label")
    (tmp_path / "all.txt").write_text("\n".join(KINDS))
    refused(["eval-zeroshot", "--model", str(root / "run"), "--images", str(tmp_path / "none-*.tar"), "--classes", str(tmp_path / "all.txt")], "no image shards found")
