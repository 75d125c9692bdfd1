"""Every caption of an image and its mined neighbours' captions in the batch (positives=all, hard negatives):
what each batch holds, checked against the cache and the mined Parquet; the draws of everything else unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from l2c.cache import TextCache
from l2c.cli import main
from l2c.pipeline.negatives import NegativesError
from l2c.storage import RunDir
from l2c.trainer.vision.data import StreamSpec
from l2c.trainer.vision.loader import make_loader
from l2c.trainer.vision.negatives import plan_negatives
from l2c.trainer.vision.pairing import plan_pairing
from l2c.trainer.vision.tower import ImageSpec
from tests.trainer.vision.test_train_vision import DIM
from tests.trainer.vision.train_helpers import class_cache_for, class_vectors, write_class_shards

FIELDS = ["txt", "json:long_caption"]


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """2 tars of 24 class images, an aligned cache of two noisy fields per key, its neighbours mined (k=4)."""
    root = tmp_path_factory.mktemp("mined")
    tars, labels = write_class_shards(root / "tars", n_shards=2, per_shard=24, n_classes=4, seed=1)
    cache = class_cache_for(tars, labels, root / "cache", class_vectors(4, DIM), fields=tuple(FIELDS), noise=0.3)
    assert main(["mine-negatives", "--text-cache", str(cache), "--k", "4", "--no-progress"]) == 0
    return [str(t) for t in tars], cache, root


def _batches(tars, cache, tmp: Path, n: int, **options) -> list[dict]:
    pairing = plan_pairing(TextCache(cache), tars, "auto", FIELDS, tmp / "index")
    spec = StreamSpec(shards=tars, pairing=pairing, image_spec=ImageSpec([32, 32], None, [0.5] * 3, [0.5] * 3),
                      batch_size=12, seed=3, num_workers=0, shuffle_buffer=16, **options)  # fmt: skip
    it = iter(make_loader(spec))
    return [next(it) for _ in range(n)]


def test_every_caption_and_neighbours_captions_in_the_batch(mined, tmp_path):
    tars, cache, _ = mined
    c = TextCache(cache)
    keys, flds, vecs = c.load()
    row = {(k, f): v for k, f, v in zip(keys, flds, vecs, strict=True)}
    neighbours = {}
    for name in c.shard_names:
        t = pq.read_table(Path(cache) / "negatives" / f"{name}.parquet")
        neighbours.update(zip(t.column("key").to_pylist(), t.column("neighbors").to_pylist(), strict=True))
    bank = plan_negatives(c, Path(cache) / "negatives", RunDir(tmp_path / "run"), FIELDS, main=True, max_rows=10**6)
    today = _batches(tars, cache, tmp_path, 3)
    got = _batches(tars, cache, tmp_path, 3, positives="all", negatives=bank, hard_negatives=2)
    for b, t in zip(got, today, strict=True):
        assert b["keys"] == t["keys"] and torch.equal(b["pixel_values"], t["pixel_values"])  # same images, crops
        n = len(b["keys"])
        assert b["owner"].tolist() == [i for i in range(n) for _ in FIELDS]  # each image's two captions
        for v, f, o in zip(b["vectors"], b["fields"], b["owner"].tolist(), strict=True):
            np.testing.assert_allclose(v.numpy(), row[(b["keys"][o], f)], rtol=1e-6)
        assert b["negatives"].shape == (2 * n, DIM)
        where = {k: i for i, k in enumerate(b["keys"])}
        for m, (v, o) in enumerate(zip(b["negatives"], b["negative_owner"].tolist(), strict=True)):
            image = b["keys"][m // 2]
            match = [k for k in neighbours[image] for f in FIELDS if np.allclose(row[(k, f)], v.numpy())]
            assert len(match) == 1  # a caption of one of the image's mined neighbours, never its own
            assert o == where.get(match[0], -1)  # the neighbour's image in this batch, if it is there
    with_negatives = _batches(tars, cache, tmp_path, 3, negatives=bank, hard_negatives=2)
    for b, t in zip(with_negatives, today, strict=True):  # one caption drawn as before: negatives change no draw
        assert b["fields"] == t["fields"] and torch.equal(b["vectors"], t["vectors"]) and "owner" not in b


def test_neighbours_of_another_cache_state_are_refused(mined, tmp_path):
    """Neighbours copied beside a cache re-embedded since (other vectors, other sha256) are refused, naming the
    command; a cache never mined names it too."""
    import shutil

    tars, cache, _ = mined
    from l2c.data.shards import read_tar

    labels = {s["__key__"]: i % 4 for t in tars for i, s in enumerate(read_tar(t))}
    other = class_cache_for([Path(t) for t in tars], labels, tmp_path / "other", class_vectors(4, DIM),
                            fields=tuple(FIELDS), noise=0.3, seed=99)  # fmt: skip
    with pytest.raises(NegativesError, match="run `l2c mine-negatives --text-cache"):
        plan_negatives(TextCache(other), Path(other) / "negatives", RunDir(tmp_path / "a"), FIELDS, True, 10**6)
    shutil.copytree(Path(cache) / "negatives", Path(other) / "negatives")
    with pytest.raises(NegativesError, match="mined from another state of text cache"):
        plan_negatives(TextCache(other), Path(other) / "negatives", RunDir(tmp_path / "b"), FIELDS, True, 10**6)
