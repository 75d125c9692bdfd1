import json

import pytest

from l2c.pipeline.sources import SourceError, expand_sources, read_shard, shard_names
from tests.pipeline.conftest import caption_shards, write_tar


def test_expand_brace_ranges_and_globs(tmp_path):
    caption_shards(tmp_path, n_shards=3, per_shard=1)
    got = expand_sources([str(tmp_path / "shard-{000..001}.tar"), str(tmp_path / "*.tar")])
    assert [p.rsplit("/", 1)[-1] for p in got] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    with pytest.raises(SourceError, match="no file matches"):
        expand_sources([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(SourceError, match="does not exist"):
        expand_sources([str(tmp_path / "missing.tar")])


def test_shard_names_disambiguate_equal_stems(tmp_path):
    names = shard_names(["/a/x/shard-0.tar", "/a/y/shard-0.tar", "/a/z.jsonl"])
    assert names["/a/z.jsonl"] == "z"
    assert len(set(names.values())) == 3 and all(n.startswith("shard-0-") for n in list(names.values())[:2])


def test_tar_rows_keep_key_order_and_count_every_reject(tmp_path):
    samples = [
        {"__key__": "k0", "txt": "a good caption", "json": {"long_caption": "a long good caption"}},
        {"__key__": "k1", "txt": "   ", "json": {"long_caption": "dense one"}},  # empty short
        {"__key__": "k2", "txt": b"\xff\xfe bad bytes", "json": {"long_caption": 42}},  # utf8 + not string
        {"__key__": "k3", "txt": "only short"},  # json member missing
        {"__key__": "k0", "txt": "duplicate key", "json": {"long_caption": "dup"}},
        {"__key__": "k4", "txt": "ok  with   spaces\n", "json": b"{not json"},
    ]
    src = write_tar(tmp_path / "bad.tar", samples)
    rows = read_shard(str(src), "bad", ["txt", "json:long_caption"])
    assert list(zip(rows.keys, rows.fields, rows.texts, strict=True)) == [
        ("k0", "txt", "a good caption"),
        ("k0", "json:long_caption", "a long good caption"),
        ("k1", "json:long_caption", "dense one"),
        ("k3", "txt", "only short"),
        ("k4", "txt", "ok  with   spaces\n"),  # kept exactly as written
    ]
    reasons = sorted((r["key"], r["field"], r["reason"]) for r in rows.rejects)
    assert reasons == [
        ("k0", None, "duplicate_key"),
        ("k1", "txt", "empty"),
        ("k2", "json:long_caption", "not_string"),
        ("k2", "txt", "invalid_utf8"),
        ("k3", "json:long_caption", "missing_field"),
        ("k4", "json:long_caption", "invalid_json"),
    ]
    assert rows.n_samples == 6


def test_damaged_tar_keeps_its_readable_samples(tmp_path):
    good_tar = caption_shards(tmp_path, 1, 50)[0]
    good = good_tar.read_bytes()
    whole = read_shard(str(good_tar), "good", ["txt"])
    broken = tmp_path / "broken.tar"
    broken.write_bytes(good[: len(good) // 2] + b"\x00garbage" * 300)
    rows = read_shard(str(broken), "broken", ["txt"])
    assert rows.partial and 0 < len(rows.keys) < 50 and rows.keys == whole.keys[: len(rows.keys)]
    assert [r["reason"] for r in rows.rejects] == ["damaged_tar"] and str(broken) in rows.rejects[0]["detail"]
    (tmp_path / "junk.tar").write_bytes(b"\x00not a tar" * 100)  # nothing readable: the shard fails whole
    junk = read_shard(str(tmp_path / "junk.tar"), "junk", ["txt"])
    assert junk.keys == [] and [r["reason"] for r in junk.rejects] == ["unreadable_shard"]


def test_jsonl_list_fields_and_bad_lines(tmp_path):
    src = tmp_path / "caps.jsonl"
    lines = [
        json.dumps({"image_id": 1, "captions": ["one", "two", "three"]}),
        "{this is not json",
        json.dumps({"image_id": 2, "captions": ["only"]}),
        json.dumps({"captions": ["no key"]}),
        json.dumps({"image_id": 1, "captions": ["dup"]}),
    ]
    src.write_text("\n".join(lines) + "\n")
    rows = read_shard(str(src), "caps", ["captions[*]", "captions[1]"], key_field="image_id")
    assert list(zip(rows.keys, rows.fields, strict=True)) == [
        ("1", "captions[0]"), ("1", "captions[1]"), ("1", "captions[2]"), ("1", "captions[1]"),
        ("2", "captions[0]"),
    ]  # fmt: skip
    assert sorted(r["reason"] for r in rows.rejects) == ["bad_record", "duplicate_key", "missing_field", "missing_key"]


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["a", "b"], "caption": ["x y", None]}), tmp_path / "t.parquet")
    rows = read_shard(str(tmp_path / "t.parquet"), "t", ["caption"])
    assert rows.keys == ["a"] and [r["reason"] for r in rows.rejects] == ["missing_field"]


def test_jsonl_line_with_invalid_utf8_is_rejected_whole_with_its_reason(tmp_path):
    """The documented choice: a line that is not UTF-8 is one counted reject naming the line; the next lines
    are read (no caption is guessed out of a damaged line)."""
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"image_id": "a", "caption": "a dog", "other": "\xc3\x28"}\n{"image_id": "b", "caption": "a cat"}\n')
    rows = read_shard(str(p), "u", ["caption"], "image_id")
    assert rows.keys == ["b"] and rows.n_samples == 2
    assert [(r["reason"], r["detail"]) for r in rows.rejects] == [("bad_record", "line 1: not valid UTF-8: invalid continuation byte")]
