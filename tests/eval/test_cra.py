"""Caption retrieval accuracy against a plain reference, on planted captions and on a real cache."""

from __future__ import annotations

import numpy as np
import pytest

from l2c.eval.cra import caption_retrieval_accuracy, cra_from_cache
from l2c.eval.errors import EvalError


def reference_cra(first: dict, second: dict, k: int) -> float:
    """Loop over images with two captions; hit if the own second caption is among the k most cosine-similar."""
    keys = [key for key in first if key in second]
    gallery = np.stack([second[key] / np.linalg.norm(second[key]) for key in keys])
    hits = 0
    for i, key in enumerate(keys):
        q = first[key] / np.linalg.norm(first[key])
        sims = [float(q @ g) for g in gallery]
        order = sorted(range(len(keys)), key=lambda j: -sims[j])
        hits += i in order[:k]
    return 100.0 * hits / len(keys)


def planted(n=120, d=24, seed=0):
    """Second captions near their first caption, with noise growing along the images (some are missed)."""
    rng = np.random.default_rng(seed)
    first = rng.standard_normal((n, d)).astype(np.float32)
    noise = np.linspace(0.1, 2.0, n, dtype=np.float32)[:, None]
    second = (first + noise * rng.standard_normal((n, d))).astype(np.float32) * rng.uniform(0.5, 3, (n, 1))
    return first, second.astype(np.float32)


def test_cra_equals_reference_on_planted_set():
    first, second = planted()
    keys = [f"k{i}" for i in range(len(first))]
    res = caption_retrieval_accuracy(keys, first, keys, second, backend="faiss")
    ref1 = reference_cra(dict(zip(keys, first, strict=True)), dict(zip(keys, second, strict=True)), 1)
    ref5 = reference_cra(dict(zip(keys, first, strict=True)), dict(zip(keys, second, strict=True)), 5)
    assert res["cra_top1"] == pytest.approx(ref1) and res["cra_top5"] == pytest.approx(ref5)
    assert 10 < res["cra_top1"] < 90 and res["cra_top5"] >= res["cra_top1"]
    assert res["n"] == len(keys) and res["n_skipped"] == 0
    assert (
        caption_retrieval_accuracy(keys, first, keys, second, backend="numpy")["cra_top1"] == res["cra_top1"]
    )


def test_cra_skips_images_with_one_caption_and_counts_them():
    first, second = planted(n=30, seed=1)
    keys = [f"k{i}" for i in range(30)]
    # k0..k2 have no second caption, k29 no first; gallery order differs from query order
    q_keys, g_keys = keys[:29], keys[3:][::-1]
    g_vecs = second[3:][::-1]
    res = caption_retrieval_accuracy(q_keys, first[:29], g_keys, g_vecs)
    ref = reference_cra(dict(zip(q_keys, first[:29], strict=True)), dict(zip(g_keys, g_vecs, strict=True)), 1)
    assert res["n"] == 26 and res["n_skipped"] == 4
    assert sorted(res["skipped_keys"]) == ["k0", "k1", "k2", "k29"]
    assert res["cra_top1"] == pytest.approx(ref)


def test_cra_from_cache_uses_first_two_fields_and_checks_them(make_cache):
    first, second = planted(n=50, seed=2)
    third = planted(n=50, seed=3)[1]
    keys = [str(1000 + i) for i in range(50)]
    all_keys = keys * 3
    fields = ["captions[0]"] * 50 + ["captions[1]"] * 50 + ["captions[2]"] * 50
    cache = make_cache(all_keys, fields, np.concatenate([first, second, third]), shard_rows=40)
    res = cra_from_cache(cache)
    assert (res["query_field"], res["gallery_field"]) == ("captions[0]", "captions[1]")
    assert res["cra_top1"] == pytest.approx(
        reference_cra(dict(zip(keys, first, strict=True)), dict(zip(keys, second, strict=True)), 1)
    )
    res2 = cra_from_cache(cache, "captions[2]", "captions[1]")
    assert res2["cra_top5"] == pytest.approx(
        reference_cra(dict(zip(keys, third, strict=True)), dict(zip(keys, second, strict=True)), 5)
    )
    with pytest.raises(EvalError, match="not in the cache"):
        cra_from_cache(cache, "captions[0]", "txt")
    with pytest.raises(EvalError, match="both"):
        cra_from_cache(cache, "captions[0]", "captions[0]")


def test_cra_bad_inputs(make_cache):
    rng = np.random.default_rng(5)
    v = rng.standard_normal((4, 8)).astype(np.float32)
    one_field = make_cache(["a", "b", "c", "d"], ["txt"] * 4, v)
    with pytest.raises(EvalError, match="CRA needs two caption fields"):
        cra_from_cache(one_field)
    dup = make_cache(["a", "a", "a", "b"], ["q", "q", "g", "g"], v)
    with pytest.raises(EvalError, match="more than once among the query"):
        cra_from_cache(dup)
    with pytest.raises(EvalError, match="at least two images"):
        caption_retrieval_accuracy(["a"], v[:1], ["a"], v[1:2])


def test_eval_cra_command_writes_eval_json(refused, make_cache, tmp_path):
    import json

    from l2c.cli import main

    first, second = planted(n=40, seed=4)
    keys = [str(i) for i in range(40)]
    cache = make_cache(keys + keys[:-1], ["short"] * 40 + ["long"] * 39, np.concatenate([first, second[:-1]]))
    assert main(["eval-cra", "--text-cache", str(cache), "--out", str(tmp_path / "out")]) == 0
    got = json.loads((tmp_path / "out" / "eval.json").read_text())
    ref = reference_cra(
        dict(zip(keys, first, strict=True)), dict(zip(keys[:-1], second[:-1], strict=True)), 1
    )
    assert got["cra_top1"] == pytest.approx(ref) and got["n"] == 39
    assert got["n_skipped"] == 1 and got["skipped_keys"] == ["39"]
    assert (got["query_field"], got["gallery_field"]) == ("short", "long")
    refused(["eval-cra", "--text-cache", str(cache), "--query-field", "nope"], "not in the cache")
    refused(["eval-cra"], "either --text-cache")
