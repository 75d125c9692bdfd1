"""make-shards on the real COCO mini set: exact counts, byte-exact images, planted bad inputs, resume."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from l2c import atomic
from l2c.cli import main
from l2c.data import make_shards as ms
from l2c.data.make_shards import MakeShardsConfig, MakeShardsError, make_shards
from l2c.data.writer import list_shards

N_REAL = 159


@pytest.fixture(scope="module")
def coco(shared_data) -> Path:
    return shared_data / "coco_mini_val2017"


@pytest.fixture(scope="module")
def records(coco) -> list[dict]:
    return [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines() if line.strip()]


def read_all(out: Path) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in list_shards(out)], shardshuffle=False))


@pytest.fixture(scope="module")
def planted(coco, records, tmp_path_factory) -> Path:
    """The real folder (symlinked) plus one of each kind of bad input."""
    d = tmp_path_factory.mktemp("planted")
    for r in records:
        (d / r["file"]).symlink_to(coco / r["file"])
    real = (coco / records[0]["file"]).read_bytes()
    (d / "corrupt.jpg").write_bytes(real[: len(real) // 3])  # truncated JPEG: header fine, data cut
    shutil.copy(coco / records[1]["file"], d / "orphan.jpg")  # no record names it
    bad = [
        {"image_id": 900001, "file": "does_not_exist.jpg", "captions": ["a ghost"]},
        {"image_id": 900002, "file": "corrupt.jpg", "captions": ["a broken picture"]},
        {"image_id": 900003, "file": records[2]["file"], "captions": []},
        {"image_id": records[3]["image_id"], "file": records[4]["file"], "captions": ["a second record, same id"]},
    ]
    lines = [json.dumps(r) for r in records + bad] + ['{"image_id": 900005, "file": ']  # malformed line
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_real_coco_exact(coco, records, tmp_path):
    out = tmp_path / "shards"
    info = make_shards(coco, coco / "captions.jsonl", out, MakeShardsConfig(shard_size=50), show_progress=False)
    assert info["records"] == N_REAL and info["written"] == N_REAL and info["rejected"] == 0
    assert [p.name for p in list_shards(out)] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert (out / "rejected.jsonl").read_text() == ""
    assert not list(out.glob(".tmp-*"))
    samples = read_all(out)
    assert len(samples) == N_REAL
    by_key = {s["__key__"]: s for s in samples}
    assert set(by_key) == {str(r["image_id"]) for r in records}
    for r in records:
        s = by_key[str(r["image_id"])]
        assert hashlib.sha256(s["jpg"]).digest() == hashlib.sha256((coco / r["file"]).read_bytes()).digest()
        assert s["txt"].decode() == r["captions"][0].strip()
        meta = json.loads(s["json"])
        assert meta["captions"] == [c.strip() for c in r["captions"]]
        assert meta["image_id"] == r["image_id"] and meta["file"] == r["file"]
        assert all(c.strip().rstrip(".") in meta["long_caption"] for c in r["captions"])
        assert (meta["width"], meta["height"]) == Image.open(coco / r["file"]).size
    # the first shard holds the first 50 records, in file order
    first = list(wds.WebDataset(str(list_shards(out)[0]), shardshuffle=False))
    assert [s["__key__"] for s in first] == [str(r["image_id"]) for r in records[:50]]


def test_planted_bad_inputs_counted_and_listed(planted, records, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = main(["make-shards", str(planted), "--captions", str(planted / "captions.jsonl"), "--out", str(out),
               "--shard-size", "64"])
    assert rc == 0
    info = json.loads((out / "info.json").read_text())
    assert info["written"] == N_REAL
    assert info["records"] == N_REAL + 5
    assert info["rejected_by_reason"] == {
        "bad_json": 1, "duplicate_id": 1, "no_captions": 1, "missing_file": 1, "unreadable_image": 1,
        "unreferenced_image": 1,
    }
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == info["rejected"] == 6
    by_reason = {r["reason"]: r for r in rejected}
    assert by_reason["missing_file"]["key"] == "900001"
    assert by_reason["unreadable_image"]["key"] == "900002" and "truncated" in by_reason["unreadable_image"]["detail"]
    assert by_reason["no_captions"]["key"] == "900003"
    assert by_reason["duplicate_id"]["key"] == str(records[3]["image_id"])
    assert by_reason["duplicate_id"]["line"] == N_REAL + 4
    assert by_reason["bad_json"]["line"] == N_REAL + 5
    assert by_reason["unreferenced_image"]["file"] == "orphan.jpg"
    keys = [s["__key__"] for s in read_all(out)]
    assert len(keys) == len(set(keys)) == N_REAL
    # the duplicate's first occurrence (the real record) is the one kept
    kept = next(s for s in read_all(out) if s["__key__"] == str(records[3]["image_id"]))
    assert json.loads(kept["json"])["file"] == records[3]["file"]
    printed = capsys.readouterr().out
    assert "rejected: unreadable_image" in printed and "rejected.jsonl" in printed


def test_strict_fails_on_first_problem(planted, records, tmp_path, capsys):
    # record-level problems are all found before any image is read
    with pytest.raises(MakeShardsError, match="5 input problem.*first: missing_file .line 160"):
        make_shards(planted, planted / "captions.jsonl", tmp_path / "s", MakeShardsConfig(strict=True),
                    show_progress=False)
    assert not list_shards(tmp_path / "s")
    # a corrupt image is found when it is decoded
    only_corrupt = tmp_path / "corrupt.jsonl"
    only_corrupt.write_text(json.dumps({"image_id": 1, "file": "corrupt.jpg", "captions": ["x"]}) + "\n")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "corrupt.jpg").symlink_to(planted / "corrupt.jpg")
    with pytest.raises(MakeShardsError, match="unreadable image .*corrupt.jpg"):
        make_shards(tmp_path / "imgs", only_corrupt, tmp_path / "s1", MakeShardsConfig(strict=True),
                    show_progress=False)
    assert not list_shards(tmp_path / "s1") and not list((tmp_path / "s1").glob(".tmp-*"))
    capsys.readouterr()
    assert main(["make-shards", str(planted), "--captions", str(planted / "captions.jsonl"), "--out",
                 str(tmp_path / "s2"), "--strict"]) == 2  # a usage error: main() shows it, exit status 2
    assert "5 input problem" in capsys.readouterr().err
    assert not (tmp_path / "s2" / "info.json").exists()


def test_max_side_reencodes(coco, tmp_path):
    out = tmp_path / "small"
    make_shards(coco, coco / "captions.jsonl", out, MakeShardsConfig(max_side=96), show_progress=False)
    samples = read_all(out)
    assert len(samples) == N_REAL
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        meta = json.loads(s["json"])
        assert img.format == "JPEG" and max(img.size) == 96 and img.size == (meta["width"], meta["height"])


def test_interrupted_run_resumes_after_last_shard(coco, tmp_path, monkeypatch):
    cfg = MakeShardsConfig(shard_size=40, workers=1)
    clean = tmp_path / "clean"
    make_shards(coco, coco / "captions.jsonl", clean, cfg, show_progress=False)

    out = tmp_path / "resumed"
    real = ms.make_sample
    calls = {"n": 0}

    def failing(record, image):
        calls["n"] += 1
        if calls["n"] == 100:
            raise KeyboardInterrupt
        return real(record, image)

    monkeypatch.setattr(ms, "make_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        make_shards(coco, coco / "captions.jsonl", out, cfg, show_progress=False)
    assert [p.name for p in list_shards(out)] == ["shard-000000.tar", "shard-000001.tar"]
    assert not (out / "info.json").exists() and not list(out.glob(".tmp-*"))
    mtimes = [p.stat().st_mtime_ns for p in list_shards(out)]

    monkeypatch.setattr(ms, "make_sample", real)
    info = make_shards(coco, coco / "captions.jsonl", out, cfg, show_progress=False)
    assert info["resumed_from_shard"] == 2 and info["written"] == N_REAL
    assert [p.stat().st_mtime_ns for p in list_shards(out)[:2]] == mtimes  # finished shards untouched
    assert [atomic.sha256_file(p) for p in list_shards(out)] == [atomic.sha256_file(p) for p in list_shards(clean)]

    again = make_shards(coco, coco / "captions.jsonl", out, cfg, show_progress=False)
    assert again["skipped"]
    with pytest.raises(MakeShardsError, match="other inputs or settings"):
        make_shards(coco, coco / "captions.jsonl", out, MakeShardsConfig(shard_size=30), show_progress=False)


def test_bad_arguments(coco, tmp_path):
    with pytest.raises(MakeShardsError, match="does not exist"):
        make_shards(tmp_path / "nope", coco / "captions.jsonl", tmp_path / "o", show_progress=False)
    with pytest.raises(MakeShardsError, match="does not exist"):
        make_shards(coco, tmp_path / "nope.jsonl", tmp_path / "o", show_progress=False)
    with pytest.raises(MakeShardsError, match="shard_size"):
        make_shards(coco, coco / "captions.jsonl", tmp_path / "o", MakeShardsConfig(shard_size=0), show_progress=False)
