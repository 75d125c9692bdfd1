"""Pairing images with cached vectors: list fields (`json:captions[*]`), the shuffled-pairs control, planning in
O(tars + shards), one manifest read per worker, and tars with and without a cache shard in one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from l2c.cache import CacheError, Manifest, ShardFinder, TextCache
from l2c.data.shards import read_tar
from l2c.fields import covers
from l2c.trainer.vision.pairing import derangement, plan_pairing, plan_tars, used_fields
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


class CountingShards(dict):
    """The manifest's real shard table, counting every walk over it (items, values, keys, iteration)."""

    walks = 0

    def _walk(self, it):
        CountingShards.walks += 1
        return it

    def items(self):
        return self._walk(super().items())

    def values(self):
        return self._walk(super().values())

    def keys(self):
        return self._walk(super().keys())

    def __iter__(self):
        return self._walk(super().__iter__())


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """60 tars of 2 images with their own shards (by source path, or by file stem), among 600 cache shards."""
    root = tmp_path_factory.mktemp("many")
    tars, _ = write_class_shards(root / "tars", n_shards=60, per_shard=2, n_classes=4)
    shards = {}
    for i, t in enumerate(tars):
        rows = [(s["__key__"], "txt", np.full(4, i, np.float32)) for s in read_tar(str(t))]
        source = str(t.resolve()) if i % 2 else f"/elsewhere/{t.name}"  # odd: by path; even: by stem
        shards[t.name.split(".")[0]] = (source, rows)
    for j in range(540):
        shards[f"other-{j:06d}"] = (f"/other/other-{j:06d}.tar", [(f"o{j}", "txt", np.zeros(4, np.float32))])
    return [str(t.resolve()) for t in tars], write_cache(root / "cache", shards, 4, ["txt"])


def test_plan_walks_the_manifest_a_fixed_number_of_times_whatever_the_tars(many_shards):
    tars, cache = many_shards
    walks = []
    for n in (6, 60):
        tc = TextCache(cache)  # a fresh handle each time: its shard lookup is built once per manifest
        assert len(tc.manifest.shards) == 600
        tc.manifest.shards = CountingShards(tc.manifest.shards)
        CountingShards.walks = 0
        plan = plan_tars(tc, tars[:n], "auto", 0)
        walks.append(CountingShards.walks)
        assert plan.aligned == {t: Path(t).name.split(".")[0] for t in tars[:n]} and not plan.join
    assert walks[0] == walks[1] <= 2, walks  # O(tars + shards): a walk per plan, none per tar
    find = ShardFinder(TextCache(cache))  # finds what shard_for_source finds, by path or by stem
    for t in [*tars, "/x/other-000007.tar", "/other/other-000008.tar", "/x/none.tar"]:
        assert find(t) == TextCache(cache).shard_for_source(t)


def test_a_worker_reads_the_manifest_once_for_all_its_tars(many_shards, monkeypatch):
    import pickle

    tars, cache = many_shards
    pairing = plan_tars(TextCache(cache), tars, "aligned", 0).pairing(TextCache(cache), ["txt"], None)
    worker = pickle.loads(pickle.dumps(pairing))  # what a spawned data worker gets: the plan, no cache
    loads = []
    real = Manifest.load.__func__
    monkeypatch.setattr(Manifest, "load", classmethod(lambda cls, d: loads.append(d) or real(cls, d)))
    got = {}
    for i, t in enumerate(tars):
        for item in worker.pair_shard(t, iter(read_tar(t))):
            if item[0] == "ok":
                got[item[1]] = int(item[3]["txt"][0])
                assert got[item[1]] == i
    assert len(got) == 2 * len(tars) and len(loads) == 1


def test_aligned_equals_join(listed, tmp_path):
    tars, keys, index, cache = listed
    tc = TextCache(cache)
    aligned = pairs(plan_pairing(tc, [str(t) for t in tars], "aligned", [SPEC], tmp_path / "a"), tars)
    join = pairs(plan_pairing(tc, [str(t) for t in tars], "join", [SPEC], tmp_path / "j"), tars)
    assert sorted(aligned) == sorted(join) == sorted(keys)
    for k in keys:
        assert sorted(aligned[k]) == sorted(join[k])
        for f in aligned[k]:
            np.testing.assert_array_equal(aligned[k][f], join[k][f])


def test_mixed_tars_are_named_and_paired_each_their_way(listed, tmp_path):
    """auto: tars with a shard aligned, one without through the join index; aligned: refused, naming it."""
    tars, keys, index, cache = listed
    tc = TextCache(cache)
    stray = tmp_path / "stray-000000.tar"
    stray.write_bytes(tars[1].read_bytes())  # the same images under a name the cache does not know
    urls = [str(tars[0]), str(stray)]
    plan = plan_tars(tc, urls, "auto", 10_000)
    assert plan.aligned == {str(tars[0]): tars[0].name.split(".")[0]} and plan.join_tars == [str(stray)]
    assert plan.report() == {"aligned_tars": 1, "join_tars": 1, "tars_without_cache_shard": 1,
                             "first_tars_without_cache_shard": [str(stray)]}  # fmt: skip
    assert plan.describe() == (f"pairing: aligned for 1 tar(s); join by key for 1 tar(s), 1 without a cache shard "
                               f"of their own (first: {stray})")  # fmt: skip
    with pytest.raises(CacheError, match=rf"pairing=aligned but 1 of 2 tar\(s\) .*first: {stray}.*l2c align-cache"):
        plan_tars(tc, urls, "aligned", 10_000, images=urls)
    mixed = pairs(plan_pairing(tc, urls, "auto", [SPEC], tmp_path / "idx"), [tars[0], stray])
    assert sorted(mixed) == sorted(keys)  # every image paired, each with its own captions
    assert all(int(v[0]) == index[k] for k, c in mixed.items() for v in c.values())
