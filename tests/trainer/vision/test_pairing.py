"""Pairing images with cached vectors: list fields (`json:captions[*]`) and the shuffled-pairs control."""

from __future__ import annotations

import numpy as np
import pytest

from l2c.cache import TextCache
from l2c.data.shards import read_tar
from l2c.fields import covers
from l2c.trainer.vision.pairing import derangement, plan_pairing, used_fields
from tests.trainer.vision.train_helpers import write_cache, write_class_shards

SPEC = "json:captions[*]"


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """2 tars x 12 images; an aligned cache with three captions per image stored as captions[0..2]; each
    vector encodes (image index, caption index) so a test can read back which row it was given."""
    root = tmp_path_factory.mktemp("listed")
    tars, _ = write_class_shards(root / "tars", n_shards=2, per_shard=12, n_classes=4)
    keys = [s["__key__"] for t in tars for s in read_tar(str(t))]
    index = {k: i for i, k in enumerate(keys)}
    shards = {}
    for t in tars:
        rows = []
        for s in read_tar(str(t)):
            for j in range(3):
                v = np.zeros(8, np.float32)
                v[0], v[1] = index[s["__key__"]], j
                rows.append((s["__key__"], f"json:captions[{j}]", v))
        shards[t.name.split(".")[0]] = (str(t.resolve()), rows)
    cache = write_cache(root / "cache", shards, 8, [SPEC])
    return tars, keys, index, cache


def pairs(pairing, tars) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for t in tars:
        for item in pairing.pair_shard(str(t), iter(read_tar(str(t)))):
            if item[0] == "ok":
                out[item[1]] = item[3]
    return out


def test_covers():
    assert covers(SPEC, "json:captions[3]") and covers(SPEC, SPEC) and covers("txt", "txt")
    assert not covers(SPEC, "json:captions") and not covers("json:captions[0]", "json:captions[1]")


@pytest.mark.parametrize("mode", ["aligned", "join"])
def test_list_field_pairs_every_element(listed, tmp_path, mode):
    tars, keys, index, cache = listed
    tc = TextCache(cache)
    fields = used_fields(tc, {})
    got = pairs(plan_pairing(tc, [str(t) for t in tars], mode, fields, tmp_path / "idx"), tars)
    assert sorted(got) == sorted(keys)
    for k, choices in got.items():
        assert sorted(choices) == [f"json:captions[{j}]" for j in range(3)]
        assert all(int(v[0]) == index[k] and int(v[1]) == int(f[-2]) for f, v in choices.items())
    # weights may name the spec or one element
    one = used_fields(tc, {"json:captions[1]": 1.0})
    only = pairs(plan_pairing(tc, [str(t) for t in tars], "auto", one, tmp_path / "idx2"), tars)
    assert all(list(c) == ["json:captions[1]"] for c in only.values())


def test_derangement_moves_everything():
    for n in (2, 3, 10, 1000):
        p = derangement(n, seed=0, salt="x")
        assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
    assert np.array_equal(derangement(50, 1, "a"), derangement(50, 1, "a"))


@pytest.mark.parametrize("mode", ["auto", "join"])
def test_shuffled_pairs_give_every_image_another_images_captions(listed, tmp_path, mode):
    tars, keys, index, cache = listed
    tc = TextCache(cache)
    true = pairs(plan_pairing(tc, [str(t) for t in tars], mode, [SPEC], tmp_path / "a"), tars)
    shuffled = pairs(plan_pairing(tc, [str(t) for t in tars], mode, [SPEC], tmp_path / "b", shuffle_seed=0), tars)
    assert sorted(shuffled) == sorted(true)  # every image still trains, on one other image's whole caption set
    owners = {k: {int(v[0]) for v in c.values()} for k, c in shuffled.items()}
    assert all(len(o) == 1 and o != {index[k]} for k, o in owners.items())
    assert sorted(next(iter(o)) for o in owners.values()) == sorted(index.values())  # a permutation
