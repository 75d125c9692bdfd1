"""Top-k search (faiss and numpy) and recall@K against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from l2c.eval import search
from l2c.eval.errors import EvalError
from l2c.eval.recall import parse_ks, recall_curve
from l2c.eval.retrieval import evaluate_retrieval


def unit(rng, n, d):
    return search.l2_normalize(rng.standard_normal((n, d)).astype(np.float32))


def brute_force_topk(q, g, k):
    """Full score matrix, full argsort: the slowest correct answer."""
    scores = q.astype(np.float64) @ g.astype(np.float64).T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx


def reference_recall(image_feats, text_feats, text_image, ks):
    """Rank = how many gallery items score strictly above the best positive (exact on tie-free data)."""
    s = image_feats.astype(np.float64) @ text_feats.astype(np.float64).T  # [images, texts]
    i2t, t2i = {}, {}
    n_img = len(image_feats)
    pos = text_image[None, :] == np.arange(n_img)[:, None]
    best_pos = np.where(pos, s, -np.inf).max(axis=1)
    i2t_rank = (s > best_pos[:, None]).sum(axis=1)
    t2i_rank = (s.T > s.T[np.arange(len(text_image)), text_image][:, None]).sum(axis=1)
    for k in ks:
        i2t[f"R@{k}"] = 100.0 * np.mean(i2t_rank < k)
        t2i[f"R@{k}"] = 100.0 * np.mean(t2i_rank < k)
    return i2t, t2i


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_topk_equals_brute_force(backend):
    rng = np.random.default_rng(0)
    q, g = unit(rng, 300, 32), unit(rng, 2000, 32)
    scores, idx = search.topk(q, g, 10, backend=backend, batch_size=64)
    np.testing.assert_array_equal(idx, brute_force_topk(q, g, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, idx, axis=1), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_faiss_and_numpy_agree_and_batching_does_not_matter():
    rng = np.random.default_rng(1)
    q, g = unit(rng, 500, 64), unit(rng, 5000, 64)
    s_f, i_f = search.topk(q, g, 20, backend="faiss")
    s_n, i_n = search.topk(q, g, 20, backend="numpy", batch_size=37)
    s_1, i_1 = search.topk(q, g, 20, backend="numpy", batch_size=10_000)
    np.testing.assert_array_equal(i_f, i_n)
    np.testing.assert_array_equal(i_n, i_1)
    np.testing.assert_allclose(s_f, s_n, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "numpy"])
def test_gallery_in_blocks_gives_the_one_block_result(backend, monkeypatch):
    """A gallery searched in blocks (top k of each merged) gives what one block gives; float16 inputs are searched
    as their float32 values; rows of queries and gallery are searched in place of copies."""
    rng = np.random.default_rng(5)
    q, g = unit(rng, 300, 32).astype(np.float16), unit(rng, 2000, 32).astype(np.float16)
    one_s, one_i = search.topk(q.astype(np.float32), g.astype(np.float32), 10, backend=backend)
    np.testing.assert_array_equal(one_i, brute_force_topk(q.astype(np.float32), g.astype(np.float32), 10))
    monkeypatch.setattr(search, "GALLERY_BLOCK_BYTES", 4 * 32 * 333)  # 333 rows a block: 7 blocks, the last short
    s, i = search.topk(q, g, 10, backend=backend, batch_size=64)
    np.testing.assert_array_equal(i, one_i)
    np.testing.assert_allclose(s, one_s, atol=1e-6)
    q_rows, g_rows = np.arange(0, 300, 3), np.arange(1, 2000, 2)
    got = np.concatenate([idx for _, _, idx in search.iter_topk(q, g, 5, backend, 16, None, q_rows, g_rows)])
    np.testing.assert_array_equal(got, brute_force_topk(q[q_rows].astype(np.float32), g[g_rows].astype(np.float32), 5))
    bad = g.copy()
    bad[1500, 3] = np.inf  # in the fifth block
    with pytest.raises(search.SearchError, match="gallery holds NaN or inf"):
        search.topk(q, bad, 10, backend=backend)


def test_topk_clips_k_and_checks_inputs():
    rng = np.random.default_rng(2)
    q, g = unit(rng, 4, 8), unit(rng, 3, 8)
    _, idx = search.topk(q, g, 10, backend="numpy")
    assert idx.shape == (4, 3) and sorted(idx[0]) == [0, 1, 2]
    _, idx_f = search.topk(q, g, 10, backend="faiss")
    np.testing.assert_array_equal(idx, idx_f)
    with pytest.raises(search.SearchError, match="dim"):
        search.topk(q, unit(rng, 3, 9), 1)
    with pytest.raises(search.SearchError, match="NaN"):
        search.topk(np.full((1, 8), np.nan, np.float32), g, 1)
    with pytest.raises(search.SearchError, match="empty"):
        search.topk(q, np.zeros((0, 8), np.float32), 1)


def test_numpy_ties_break_by_index():
    g = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    _, idx = search.topk(np.array([[1, 0]], np.float32), g, 3, backend="numpy")
    assert idx.tolist() == [[0, 1, 3]]


def test_auto_backend_is_faiss_on_this_machine():
    assert search.resolve_backend("auto") in ("faiss", "faiss-gpu")


def test_recall_equals_reference_on_random_data():
    rng = np.random.default_rng(3)
    n_img, per_img, d = 200, 5, 16
    images = unit(rng, n_img, d)
    text_image = np.repeat(np.arange(n_img), per_img)
    # captions near their image, noisy enough that recall is neither 0 nor 100
    texts = search.l2_normalize(images[text_image] + 0.35 * rng.standard_normal((n_img * per_img, d)))
    keys = [f"img{i:04d}" for i in range(n_img)]
    text_keys = [keys[i] for i in text_image]
    fields = [f"captions[{j}]" for _ in range(n_img) for j in range(per_img)]
    ks = [1, 5, 10]
    for backend in ("faiss", "numpy"):
        res = evaluate_retrieval(keys, images, text_keys, fields, texts, ks=ks, backend=backend)
        i2t, t2i = reference_recall(images, texts, text_image, ks)
        assert res["image_to_text"] == pytest.approx(i2t)
        assert res["text_to_image"] == pytest.approx(t2i)
        assert 5 < res["text_to_image"]["R@1"] < 95
        assert res["n_images"] == n_img and res["n_texts"] == n_img * per_img
        # curve agrees with the point values and is monotone
        curve = res["curves"]
        assert curve["text_to_image"][4] == pytest.approx(t2i["R@5"])
        assert np.all(np.diff(curve["image_to_text"]) >= 0)
        # per-field recall: each field alone against the reference
        assert set(res["per_field"]) == set(fields)
        m = np.array(fields) == "captions[2]"
        i2t_f, t2i_f = reference_recall(images, texts[m], text_image[m], ks)
        assert res["per_field"]["captions[2]"]["text_to_image"] == pytest.approx(t2i_f)
        assert res["per_field"]["captions[2]"]["image_to_text"] == pytest.approx(i2t_f)


def test_recall_hand_checked_case():
    images = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    texts = search.l2_normalize(np.array([[1, 0.1], [0.9, 0.3], [-1, 0.2], [0.1, 1]], np.float32))
    # t0 → img0 first (rank 0); t1 (img1) → img0, img1 (rank 1); t2 → img2 (0); t3 (img2) → img1, img0, img2 (2)
    # img0 → t0 first (0); img1 → t3, t1 (1); img2 → t2 first (0)
    res = evaluate_retrieval(
        ["a", "b", "c"], images, ["a", "b", "c", "c"], ["cap", "cap", "cap", "long"], texts, ks=[1, 2, 3]
    )
    assert res["text_to_image"] == pytest.approx({"R@1": 50.0, "R@2": 75.0, "R@3": 100.0})
    assert res["image_to_text"] == pytest.approx({"R@1": 200 / 3, "R@2": 100.0, "R@3": 100.0})
    assert res["fields"] == ["cap", "long"]


def test_missing_and_duplicate_keys():
    rng = np.random.default_rng(4)
    images, texts = unit(rng, 4, 8), unit(rng, 4, 8)
    f = ["cap"] * 4
    with pytest.raises(
        EvalError, match=r"1 image\(s\) have no caption \('d'\).*1 caption\(s\) have no image"
    ):
        evaluate_retrieval(["a", "b", "c", "d"], images, ["a", "b", "c", "x"], f, texts)
    res = evaluate_retrieval(["a", "b", "c", "d"], images, ["a", "b", "c", "x"], f, texts, allow_missing=True)
    assert res["missing"]["images_without_text"] == 1 and res["missing"]["image_keys"] == ["d"]
    assert res["missing"]["texts_without_image"] == 1 and res["missing"]["text_keys"] == [["x", "cap"]]
    assert res["n_images"] == 4 and res["n_image_queries"] == 3 and res["n_texts"] == 3
    with pytest.raises(EvalError, match="duplicate image key"):
        evaluate_retrieval(["a", "a", "c", "d"], images, ["a", "c", "d", "d"], f, texts)
    with pytest.raises(EvalError, match=r"duplicate \(key, field\)"):
        evaluate_retrieval(["a", "b", "c", "d"], images, ["a", "b", "c", "c"], f, texts)


def test_recall_curve_and_parse_ks():
    assert recall_curve(np.array([0, 1, 1, 5]), 3) == [25.0, 75.0, 75.0]
    assert parse_ks("10,1, 5,5") == [1, 5, 10]
    with pytest.raises(ValueError):
        parse_ks("0,1")
    with pytest.raises(ValueError):
        parse_ks("a")
