"""eval-retrieval's streamed text side against the in-memory computation: real tars, a real exported model, a
real Parquet cache ten times larger than the evaluated images, in several row groups and gallery blocks."""

from __future__ import annotations

import numpy as np
import pytest
from eval_reference import export_tiny_model, write_shards

from l2c.cache import TextCache
from l2c.eval import search
from l2c.eval.features import expand_shards, extract_image_features
from l2c.eval.model import adapt_texts, load_model
from l2c.eval.retrieval import caption_gallery, evaluate_gallery, evaluate_retrieval, run_retrieval

TEXT_DIM = 16
FIELDS = ["txt", "json:long_caption", "json:captions[0]"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    samples = write_shards(root / "shards", n_shards=2, per_shard=20)
    settings = {"model": "test-encoder", "dim": TEXT_DIM, "fields": FIELDS, "model_fingerprint": "f00d",
                "store_dtype": "float16"}  # fmt: skip
    export_tiny_model(root / "run", TEXT_DIM, settings)
    return root, [s["key"] for s in samples]


def big_cache(make_cache, keys: list[str], seed: int = 0):
    """Every image's three captions, plus ten times as many of other keys, mixed over 7 shards of several row
    groups each; vectors near a per-key direction, so recall is neither 0 nor 100."""
    rng = np.random.default_rng(seed)
    all_keys = keys + [f"other-{i:05d}" for i in range(10 * len(keys))]
    base = {k: rng.standard_normal(TEXT_DIM) for k in all_keys}
    rows = [(k, f) for k in all_keys for f in FIELDS]
    order = rng.permutation(len(rows))
    t_keys = [rows[i][0] for i in order]
    t_fields = [rows[i][1] for i in order]
    vecs = np.stack([base[k] + 0.8 * rng.standard_normal(TEXT_DIM) for k in t_keys]).astype(np.float32)
    return make_cache(t_keys, t_fields, vecs, fingerprint="f00d", shard_rows=200, store_dtype="float16"), base


def test_streamed_text_side_gives_the_in_memory_recall(setup, make_cache, monkeypatch):
    import l2c.cache as cache_mod

    root, keys = setup
    monkeypatch.setattr(cache_mod, "ROW_GROUP_BYTES", 1)  # 1,024 rows a group (the least)
    cache_dir, _ = big_cache(make_cache, keys)
    cache = TextCache(cache_dir)
    assert sum(cache.open_shard(n).num_row_groups for n in cache.shard_names) > len(cache.shard_names) - 1
    monkeypatch.setattr(search, "GALLERY_BLOCK_BYTES", 4 * 24 * 37)  # 37 rows a block: captions in 4 blocks
    images = str(root / "shards")
    ks = [1, 5, 10]
    for backend, text_dtype in (("faiss", "auto"), ("numpy", "auto"), ("faiss", "float16")):
        got = run_retrieval(root / "run", [images], cache_dir, ks, backend=backend, text_dtype=text_dtype)
        assert got["caption_features_dtype"] == {"auto": "float32", "float16": "float16"}[text_dtype]

        # the in-memory computation: the whole cache loaded as float32, adapted at once, orphans left out
        net = load_model(root / "run")
        img = extract_image_features(net, expand_shards([images]))
        t_keys, t_fields, vecs = cache.load()
        want = evaluate_retrieval(img.keys, img.features, t_keys, t_fields, adapt_texts(net, vecs), ks, backend,
                                  allow_missing=True)  # fmt: skip
        assert want["missing"]["texts_without_image"] == 10 * len(keys) * len(FIELDS)
        for name in ("image_to_text", "text_to_image", "curves", "per_field", "fields", "n_images", "n_texts",
                     "n_image_queries"):  # fmt: skip
            assert got[name] == want[name], name
        assert got["n_texts"] == len(keys) * len(FIELDS)
        assert got["missing"]["texts_without_image"] == 0 and got["missing"]["images_without_text"] == 0
        assert got["cache_rows_not_evaluated"] == 10 * len(keys) * len(FIELDS)


def test_caption_gallery_is_float16_of_the_evaluated_images_only(setup, make_cache):
    root, keys = setup
    cache = TextCache(big_cache(make_cache, keys, seed=1)[0])
    net = load_model(root / "run")
    wanted = keys[::3]
    g = caption_gallery(cache, wanted, ["json:long_caption", "txt"], net, "float16")
    assert g.feats.dtype == np.float16 and g.feats.shape == (2 * len(wanted), 24)
    assert sorted(set(g.image.tolist())) == list(range(len(wanted))) and g.other_rows == 2 * (len(cache) // 3 - len(wanted))
    t_keys, t_fields, vecs = cache.load(["json:long_caption", "txt"])
    rows = [i for i, k in enumerate(t_keys) if k in set(wanted)]
    assert [wanted[i] for i in g.image] == [t_keys[i] for i in rows]
    assert [g.fields[i] for i in g.field] == [t_fields[i] for i in rows]
    np.testing.assert_allclose(g.feats.astype(np.float32), adapt_texts(net, vecs[rows]), atol=1e-3)


def test_streamed_recall_equals_in_memory_where_recall_means_something(setup, make_cache, monkeypatch):
    """Image features near their captions' adapted direction (recall well above chance): the caption gallery
    searched in blocks, float32 (what `auto` keeps at this size) and float16, ranks as the float32 in-memory
    computation does."""
    root, keys = setup
    cache_dir, base = big_cache(make_cache, keys, seed=2)
    cache, net = TextCache(cache_dir), load_model(root / "run")
    rng = np.random.default_rng(7)
    image_feats = search.l2_normalize(adapt_texts(net, np.stack([base[k] for k in keys]).astype(np.float32))
                                      + 0.05 * rng.standard_normal((len(keys), 24)))  # fmt: skip
    t_keys, t_fields, vecs = cache.load()
    text_feats = adapt_texts(net, vecs)
    monkeypatch.setattr(search, "GALLERY_BLOCK_BYTES", 4 * 24 * 50)
    for backend, dtype in (("faiss", "auto"), ("numpy", "auto"), ("faiss", "float16"), ("numpy", "float16")):
        want = evaluate_retrieval(keys, image_feats, t_keys, t_fields, text_feats, [1, 5, 10], backend,
                                  allow_missing=True)  # fmt: skip
        texts = caption_gallery(cache, keys, None, net, dtype)
        assert texts.feats.dtype == (np.float32 if dtype == "auto" else np.float16)
        got = evaluate_gallery(keys, image_feats, texts, [1, 5, 10], backend)
        assert 30 < want["text_to_image"]["R@1"] < 95 and 30 < want["image_to_text"]["R@1"] < 100
        for name in ("image_to_text", "text_to_image", "curves", "per_field", "fields", "n_texts"):
            assert got[name] == want[name], name
