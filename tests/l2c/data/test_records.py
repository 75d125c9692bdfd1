"""The one caption-record reader: JSONL and Parquet, bad lines counted with their line numbers, never fatal."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from l2c.data.records import BadRecord, iter_records, read_records


def test_jsonl_bad_lines_are_counted_with_their_numbers(tmp_path):
    src = tmp_path / "caps.jsonl"
    src.write_bytes(b"".join([
        json.dumps({"key": "a", "captions": ["one"]}).encode() + b"\n",
        b"\n",  # blank: skipped, not counted
        b"{not json\n",
        b'{"key": "\xff\xfe"}\n',  # not UTF-8
        b"[1, 2]\n",
        json.dumps({"key": "b"}).encode(),  # last line without a newline
    ]))  # fmt: skip
    got = list(iter_records(src))
    assert [n for n, _ in got] == [1, 3, 4, 5, 6]
    bad = [r for _, r in got if isinstance(r, BadRecord)]
    assert [(b.line, b.reason) for b in bad] == [(3, "bad_json"), (4, "bad_json"), (5, "not_object")]
    assert bad[0].detail.startswith("not valid JSON") and str(bad[2]) == f"{src}:5: expected an object, got list"
    counted: list = []
    assert [r["key"] for r in read_records(str(src), counted)] == ["a", "b"] and counted == bad


def test_parquet_rows_in_order_and_fsspec_urls(tmp_path):
    import fsspec

    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5000)], "caption": ["x"] * 5000}), tmp_path / "t.parquet")
    rows = list(iter_records(tmp_path / "t.parquet"))
    assert [n for n, _ in rows[:3]] == [1, 2, 3] and [r["key"] for _, r in rows] == [f"k{i}" for i in range(5000)]
    fs = fsspec.filesystem("memory")
    fs.pipe("/l2c-test-records/caps.jsonl", b'{"key": "m"}\nnope\n')
    try:
        bad: list = []
        assert list(read_records("memory://l2c-test-records/caps.jsonl", bad)) == [{"key": "m"}] and len(bad) == 1
    finally:
        fs.rm("/l2c-test-records", recursive=True)


def test_every_record_path_counts_the_same_bad_lines(tmp_path):
    """embed-captions, the text trainer and make-shards read a captions file with the same reader."""
    from l2c.data.make_shards import MakeShardsConfig
    from l2c.data.make_shards import read_records as make_shards_records
    from l2c.pipeline.sources import read_shard
    from l2c.trainer.text.data import load_caption_groups

    src = tmp_path / "caps.jsonl"
    src.write_text("\n".join([
        json.dumps({"image_id": 1, "file": "1.jpg", "captions": ["a dog", "a brown dog"]}),
        "{broken",
        json.dumps({"image_id": 2, "file": "2.jpg", "captions": ["a cat", "a grey cat"]}),
        "42",
    ]) + "\n")  # fmt: skip
    rows = read_shard(str(src), "caps", ["captions[0]"], key_field="image_id")
    assert rows.keys == ["1", "2"]
    assert [(r["reason"], r["detail"].split(":")[0]) for r in rows.rejects] == [("bad_record", "line 2"),
                                                                                ("bad_record", "line 4")]
    groups, report = load_caption_groups([src])
    assert [g.key for g in groups] == ["1", "2"] and report.skipped_bad_lines == 2
    for name in ("1.jpg", "2.jpg"):
        (tmp_path / name).write_bytes(b"")
    records, rejected = make_shards_records(tmp_path, src, MakeShardsConfig())
    assert [r.key for r in records] == ["1", "2"]
    assert [(r["reason"], r["line"]) for r in rejected] == [("bad_json", 2), ("bad_json", 4)]
