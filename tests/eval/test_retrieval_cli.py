"""eval-retrieval end to end: real webdataset tars, a real exported model, a real Parquet text cache."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from eval_reference import export_tiny_model, features_by_hand, reference_recall, write_shards

from l2c.cli import main

TEXT_DIM = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    samples = write_shards(root / "shards", n_shards=2, per_shard=15)
    settings = {"model": "test-encoder", "dim": TEXT_DIM, "fields": ["txt", "json:long_caption"],
                "model_fingerprint": "f00d", "store_dtype": "float32"}  # fmt: skip
    export_tiny_model(root / "run", TEXT_DIM, settings)
    return root, samples, settings


def test_eval_retrieval_matches_reference(setup, make_cache, tmp_path):
    root, samples, settings = setup
    rng = np.random.default_rng(0)
    keys = [s["key"] for s in samples]
    # two short captions and one long caption per image
    t_keys = keys * 2 + keys
    t_fields = ["txt"] * len(keys) + ["txt2"] * len(keys) + ["json:long_caption"] * len(keys)
    vecs = rng.standard_normal((len(t_keys), TEXT_DIM)).astype(np.float32)
    cache = make_cache(t_keys, t_fields, vecs, fingerprint="f00d", shard_rows=25)
    out = tmp_path / "out"
    images = str(root / "shards" / "shard-{00000..00001}.tar")
    assert main(["eval-retrieval", "--model", str(root / "run"), "--images", images, "--text-cache", str(cache),
                 "--k", "1,5,10", "--out", str(out), "--backend", "faiss"]) == 0  # fmt: skip
    got = json.loads((out / "eval.json").read_text())
    assert list(got)[:4] == ["image_to_text", "text_to_image", "n_images", "n_texts"]
    assert got["n_images"] == 30 and got["n_texts"] == 90 and got["missing"]["images_without_text"] == 0
    assert (out / "recall_curves.png").stat().st_size > 1000

    m, hand_keys, hand_feats = features_by_hand(root / "run", sorted((root / "shards").glob("*.tar")))
    assert hand_keys == keys
    with torch.no_grad():
        text_feats = m.encode_text(torch.from_numpy(vecs)).numpy()
    text_image = np.array([keys.index(k) for k in t_keys])
    i2t, t2i = reference_recall(hand_feats, text_feats, text_image, [1, 5, 10])
    assert got["image_to_text"] == pytest.approx(i2t, abs=1e-4)  # eval.json: 4 decimals
    assert got["text_to_image"] == pytest.approx(t2i, abs=1e-4)
    # one field only
    m_long = np.array(t_fields) == "json:long_caption"
    i2t_l, t2i_l = reference_recall(hand_feats, text_feats[m_long], text_image[m_long], [1, 5])
    res = main(["eval-retrieval", "--model", str(root / "run" / "export"), "--images", str(root / "shards"),
                "--text-cache", str(cache), "--fields", "json:long_caption", "--k", "1,5", "--out", str(out)])  # fmt: skip
    assert res == 0
    got = json.loads((out / "eval.json").read_text())
    assert got["n_texts"] == 30 and got["fields"] == ["json:long_caption"] and "per_field" not in got
    assert got["text_to_image"] == pytest.approx(t2i_l, abs=1e-4)
    assert got["image_to_text"] == pytest.approx(i2t_l, abs=1e-4)


def test_eval_retrieval_refuses_mismatched_cache(refused, setup, make_cache):
    root, samples, _ = setup
    keys = [s["key"] for s in samples]
    rng = np.random.default_rng(1)
    args = ["eval-retrieval", "--model", str(root / "run"), "--images", str(root / "shards"), "--text-cache"]
    wrong_dim = make_cache(keys, ["txt"] * 30, rng.standard_normal((30, 8)), fingerprint="f00d")
    refused([*args, str(wrong_dim)], "holds 8-d vectors but the model's adapter takes 16-d")
    wrong_fp = make_cache(keys, ["txt"] * 30, rng.standard_normal((30, TEXT_DIM)), fingerprint="beef")
    refused([*args, str(wrong_fp)], "model_fingerprint: the model f00d…, the cache beef…")
    good = make_cache(keys, ["txt"] * 30, rng.standard_normal((30, TEXT_DIM)), fingerprint="f00d")
    refused([*args, str(good), "--fields", "long"], r"field .long. is not in text cache .* it holds txt")


# every teacher identity key, changed to another valid value: the cache is refused naming the key and both values
OTHER_TEACHER = {"engine": ("hf", "vllm"), "pooling": ("mean", "cls"), "prompt_format": ("none", "llm2vec-llama3"),
                 "instruction": ("", "Describe the image."), "normalize": (True, False), "max_length": (512, 128),
                 "dtype": ("float32", "bfloat16"), "store_dtype": ("float32", "float16"),
                 "bidirectional": (True, False), "model_fingerprint": ("f00d", "beef")}  # fmt: skip


@pytest.mark.parametrize("key", sorted(OTHER_TEACHER))
def test_eval_retrieval_refuses_a_cache_of_another_teacher(key, refused, setup, make_cache):
    from l2c.teacher import IDENTITY

    assert set(OTHER_TEACHER) == set(IDENTITY)
    root, samples, _ = setup
    keys = [s["key"] for s in samples]
    vecs = np.random.default_rng(4).standard_normal((30, TEXT_DIM))
    mine, other = OTHER_TEACHER[key]
    kw = {"store_dtype": other} if key == "store_dtype" else {"fingerprint": other} if key == "model_fingerprint" else {}
    teacher = {key: other} if key not in ("store_dtype", "model_fingerprint") else {}
    cache = make_cache(keys, ["txt"] * 30, vecs, **{"fingerprint": "f00d", **kw}, teacher=teacher)
    shown = (lambda v: f"{v}…") if key == "model_fingerprint" else repr
    refused(["eval-retrieval", "--model", str(root / "run"), "--images", str(root / "shards"), "--text-cache", str(cache)],
            re.escape(f"{key}: the model {shown(mine)}, the cache {shown(other)}"))


def test_eval_retrieval_missing_and_duplicate_keys(refused, setup, make_cache, tmp_path):
    root, samples, _ = setup
    keys = [s["key"] for s in samples]
    rng = np.random.default_rng(2)
    # the first image has no caption; one caption belongs to no image
    t_keys = keys[1:] + ["not-an-image"]
    cache = make_cache(t_keys, ["txt"] * 30, rng.standard_normal((30, TEXT_DIM)), fingerprint="f00d")
    args = ["eval-retrieval", "--model", str(root / "run"), "--images", str(root / "shards"), "--text-cache",
            str(cache)]  # fmt: skip
    refused(args, r"1 image\(s\) have no caption \('s0-0000'\)\. Check")
    assert main([*args, "--allow-missing", "--out", str(tmp_path / "o")]) == 0
    got = json.loads((tmp_path / "o" / "eval.json").read_text())
    # the caption of a key that is no evaluated image is outside the evaluation: counted, not read, not missing
    assert got["missing"]["image_keys"] == ["s0-0000"] and got["missing"]["text_keys"] == []
    assert got["cache_rows_not_evaluated"] == 1
    assert got["n_images"] == 30 and got["n_image_queries"] == 29 and got["n_texts"] == 29
    # the same key in two shards
    dup = tmp_path / "dup"
    write_shards(dup, n_shards=1, per_shard=3)
    (dup / "shard-00000.tar").rename(dup / "a.tar")
    write_shards(dup, n_shards=1, per_shard=3, seed=1)
    refused(["eval-retrieval", "--model", str(root / "run"), "--images", str(dup), "--text-cache", str(cache)], "duplicate image key 's0-0000'")


def test_eval_retrieval_on_ray_equals_in_process(setup, make_cache, ray_local, tmp_path):
    """--ray-address: image features from Ray tasks (one per shard here) give exactly the in-process result."""
    root, samples, _ = setup
    keys = [s["key"] for s in samples]
    vecs = np.random.default_rng(3).standard_normal((len(keys), TEXT_DIM)).astype(np.float32)
    cache = make_cache(keys, ["txt"] * len(keys), vecs, fingerprint="f00d", shard_rows=25)
    args = ["eval-retrieval", "--model", str(root / "run"), "--images", str(root / "shards"), "--text-cache",
            str(cache), "--backend", "numpy"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray-address", "auto"]) == 0
    local, on_ray = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("local", "ray"))
    assert on_ray["n_images"] == local["n_images"] == 30
    for direction in ("image_to_text", "text_to_image"):
        assert on_ray[direction] == pytest.approx(local[direction], abs=1e-9)
    from l2c.eval.features import expand_shards
    from l2c.eval.ray_features import extract_on_ray

    feats = extract_on_ray(root / "run", expand_shards([str(root / "shards")]), ray_address="auto", tasks=2)
    assert feats.keys == keys and feats.features.shape == (30, feats.features.shape[1])


def test_five_captions_per_image_from_one_star_field(setup, make_cache, tmp_path):
    """A cache embedded with `--text-field 'json:captions[*]'` (rows json:captions[0..4]) gives standard
    five-caption retrieval by default, and by the spec or one row name on --fields."""
    from l2c.cache import Manifest

    root, samples, _ = setup
    keys = [s["key"] for s in samples]
    t_keys = [k for k in keys for _ in range(5)]
    t_fields = [f"json:captions[{i}]" for _ in keys for i in range(5)]
    vecs = np.random.default_rng(3).standard_normal((len(t_keys), TEXT_DIM)).astype(np.float32)
    cache = make_cache(t_keys, t_fields, vecs, fingerprint="f00d")
    m = Manifest.load(cache)
    m.settings["fields"] = ["json:captions[*]"]  # what embed-captions records for that spec
    m.save(cache)
    base = ["eval-retrieval", "--model", str(root / "run"), "--images", str(root / "shards"), "--text-cache", str(cache)]
    for extra, n in (([], 150), (["--fields", "json:captions[*]"], 150), (["--fields", "json:captions[2]"], 30)):
        out = tmp_path / f"out{n}{len(extra)}"
        assert main([*base, *extra, "--out", str(out)]) == 0
        assert json.loads((out / "eval.json").read_text())["n_texts"] == n
