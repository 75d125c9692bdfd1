"""Caption sources and pair sampling: bad records counted, one pair per image per batch, resumable by step."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2c.trainer.text.data import PairDataError, PairSampler, group_ids, load_caption_groups


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_records_are_counted(tmp_path):
    src = write_jsonl(
        tmp_path / "caps.jsonl",
        [
            {"image_id": 1, "captions": ["a dog", "a brown dog", "  "]},
            {"image_id": 2, "captions": ["only one"]},
            {"image_id": 3, "captions": ["same", "same"]},
            {"image_id": 4, "captions": ["x", 7, ""]},
            {"captions": ["no key", "at all"]},
            {"image_id": 5, "captions": ["two", "captions"]},
        ],
    )
    groups, report = load_caption_groups([src])
    assert [g.key for g in groups] == ["1", "5"]
    assert groups[0].captions == ["a dog", "a brown dog"]
    assert report.records == 6 and report.images == 2 and report.captions == 4
    assert report.skipped_few_captions == 3  # 2 (one caption), 3 (duplicate), 4 (one usable)
    assert report.dropped_empty == 2 and report.dropped_duplicate == 1 and report.dropped_not_text == 1
    assert report.skipped_no_key == 1
    assert "3 images with < 2 usable captions" in report.summary()


def test_no_usable_image_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "captions": ["one"]}])
    with pytest.raises(PairDataError, match="no image with two usable captions"):
        load_caption_groups([src])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 1, "captions": ["a", "b"]}\n{oops\n[1, 2]\n')
    groups, report = load_caption_groups([bad])  # bad lines are counted, not fatal (l2c.data.records)
    assert [g.key for g in groups] == ["1"] and report.records == 1 and report.skipped_bad_lines == 2
    assert "2 bad lines, first " in report.summary() and "bad.jsonl:2: not valid JSON" in report.summary()


def test_parquet_wide_and_long_layouts(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b"], "captions": [["a1", "a2"], ["b1", "b2", "b3"]]}), tmp_path / "w.parquet")
    pq.write_table(pa.table({"id": ["c", "c", "d"], "caption": ["c1", "c2", "d1"]}), tmp_path / "l.parquet")
    groups, report = load_caption_groups([tmp_path / "w.parquet", tmp_path / "l.parquet"])
    assert {g.key: g.captions for g in groups} == {"a": ["a1", "a2"], "b": ["b1", "b2", "b3"], "c": ["c1", "c2"]}
    assert report.merged_records == 1 and report.skipped_few_captions == 1  # d has one caption


def test_text_cache_sources(tmp_path):
    """A cache directory is read through its manifest's source files."""
    from l2c.cache import Manifest, ShardEntry

    src = write_jsonl(tmp_path / "src.jsonl", [{"image_id": i, "captions": [f"c{i}a", f"c{i}b"]} for i in range(3)])
    cache = tmp_path / "cache"
    cache.mkdir()
    Manifest(settings={"dim": 4}, shards={"src": ShardEntry("src.parquet", str(src), 3, "0")}).save(cache)
    groups, _ = load_caption_groups([cache])
    assert [g.key for g in groups] == ["0", "1", "2"]


def test_sampler_one_pair_per_image_and_deterministic(shared_data):
    groups, _ = load_caption_groups([shared_data / "flickr8k_dev_captions.jsonl"])
    sampler = PairSampler(groups, batch_size=64, seed=3)
    by_key = {g.key: set(g.captions) for g in groups}
    seen = Counter()
    for step in range(sampler.steps_per_epoch):
        batch = sampler.batch(step)
        assert len(batch) == 64 and len(set(batch.keys)) == 64  # at most one pair per image per batch
        for k, a, b in zip(batch.keys, batch.a, batch.b, strict=True):
            assert a != b and a in by_key[k] and b in by_key[k]  # two different captions of that image
        seen.update(batch.keys)
    assert max(seen.values()) == 1 and len(seen) == sampler.steps_per_epoch * 64  # an epoch visits each once
    again = PairSampler(groups, batch_size=64, seed=3)
    assert again.batch(17).a == sampler.batch(17).a  # resuming needs only the step
    assert PairSampler(groups, batch_size=64, seed=4).batch(17).a != sampler.batch(17).a


def test_text_pairs_mixed_at_ratio(shared_data):
    groups, _ = load_caption_groups([shared_data / "flickr8k_dev_captions.jsonl"])
    batch = PairSampler(groups, batch_size=40, seed=0, text_ratio=0.25, sentences=["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10"]).batch(0)
    text = [i for i, k in enumerate(batch.keys) if k.startswith("text:")]
    assert len(text) == 10 and all(batch.a[i] == batch.b[i] for i in text)
    assert sum(1 for k in batch.keys if not k.startswith("text:")) == 30


def test_identical_captions_of_different_images_share_a_group():
    keys = ["img1", "img2", "img3", "text:4"]
    a = ["a dog runs", "a cat", "two birds", "a cat"]
    b = ["dog running", "A dog on grass", "birds", "a cat"]
    g = group_ids(keys, a, b)
    assert g[1] == g[3] and len({g[0], g[1], g[2]}) == 3


def test_sharding_splits_the_global_batch(shared_data):
    groups, _ = load_caption_groups([shared_data / "flickr8k_dev_captions.jsonl"])
    batch = PairSampler(groups, batch_size=8, seed=0).batch(2)
    parts = [batch.shard(r, 2) for r in range(2)]
    assert parts[0].a + parts[1].a == batch.a and parts[0].group + parts[1].group == batch.group
