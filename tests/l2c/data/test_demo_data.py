"""make-demo-data: real tars read back with webdataset; counts, keys, caption/object consistency, determinism."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from l2c import atomic
from l2c.cli import main
from l2c.data import demo_data
from l2c.data.demo_data import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    POSITION_PHRASES,
    DemoDataConfig,
    DemoDataError,
    make_demo_data,
)
from l2c.data.writer import list_shards

SMALL = DemoDataConfig(n=120, val_n=30, shard_size=50, seed=7)


def read_split(directory: Path) -> list[dict]:
    urls = [str(p) for p in list_shards(directory)]
    return list(wds.WebDataset(urls, shardshuffle=False))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(out, DemoDataConfig(**vars(SMALL)), show_progress=False)
    return out


def test_layout_and_counts(small):
    assert [p.name for p in list_shards(small / "train")] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [p.name for p in list_shards(small / "val")] == ["shard-000000.tar"]
    assert not list(small.rglob(".tmp-*"))
    assert (small / "classes.txt").read_text().split("\n")[:-1] == list(KINDS)
    templates = (small / "templates.txt").read_text().splitlines()
    assert templates and all(t.count("{}") == 1 for t in templates)
    info = json.loads((small / "info.json").read_text())
    assert info["splits"]["train"]["n"] == 120 and info["splits"]["val"]["n"] == 30
    assert sum(info["splits"]["train"]["label_counts"].values()) == 120
    train, val = read_split(small / "train"), read_split(small / "val")
    assert len(train) == 120 and len(val) == 30
    # shard sizes: 50, 50, 20
    assert [len(list(wds.WebDataset(str(p), shardshuffle=False))) for p in list_shards(small / "train")] == [50, 50, 20]


def test_keys_unique_and_members_complete(small):
    train, val = read_split(small / "train"), read_split(small / "val")
    train_keys, val_keys = [s["__key__"] for s in train], [s["__key__"] for s in val]
    assert len(set(train_keys)) == 120 and len(set(val_keys)) == 30
    assert not set(train_keys) & set(val_keys)
    assert train_keys[0] == "train-00000000" and val_keys[-1] == "val-00000029"
    for s in train + val:
        assert {"jpg", "txt", "json", "cls"} <= set(s)
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
        assert s["txt"].decode()
        meta = json.loads(s["json"])
        assert {"caption", "long_caption", "label", "label_index", "objects", "background"} <= set(meta)


def _expected_relations(a: dict, b: dict) -> list[str]:
    rel = []
    if a["x"] < b["x"] - demo_data.RELATION_MARGIN:
        rel.append("to the left of")
    elif a["x"] > b["x"] + demo_data.RELATION_MARGIN:
        rel.append("to the right of")
    if a["y"] < b["y"] - demo_data.RELATION_MARGIN:
        rel.append("above")
    elif a["y"] > b["y"] + demo_data.RELATION_MARGIN:
        rel.append("below")
    rank = {"small": 0, "medium": 1, "large": 2}
    if rank[a["size"]] != rank[b["size"]]:
        rel.append("larger than" if rank[a["size"]] > rank[b["size"]] else "smaller than")
    return rel


def test_captions_match_objects_and_pixels(small):
    samples = read_split(small / "train")
    counts = set()
    for s in samples:
        meta = json.loads(s["json"])
        objs = meta["objects"]
        counts.add(len(objs))
        names = [f"{o['color']} {o['kind']}" for o in objs]
        # short caption: every object's colour and kind, main object first, nothing else
        txt = s["txt"].decode()
        assert txt == meta["caption"]
        assert txt.replace(", ", " and ").split(" and ") == [("an " if n[0] in "aeiou" else "a ") + n for n in names]
        assert len(set(names)) == len(names)
        # label: the single large object, first in the list
        assert objs[0]["size"] == "large" and all(o["size"] != "large" for o in objs[1:])
        assert meta["label"] == objs[0]["kind"] and KINDS[int(s["cls"])] == meta["label"]
        long = meta["long_caption"]
        for o in objs:
            assert f"{o['size']} {o['color']} {o['kind']} {POSITION_PHRASES[o['position']]}" in long
            assert o["position"] == demo_data.position_name(o["x"], o["y"])
            assert o["radius"] <= o["x"] <= 1 - o["radius"] and o["radius"] <= o["y"] <= 1 - o["radius"]
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) >= a["radius"] + b["radius"]  # no overlap
                rel = _expected_relations(a, b)
                sentence = f"The {a['color']} {a['kind']} is {demo_data._join(rel)} the {b['color']} {b['kind']}."
                assert (sentence in long) == bool(rel)
        # the pixel at each object's centre has that object's colour (JPEG tolerance)
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.int32)
        for o in objs:
            px = img[int(o["y"] * 64), int(o["x"] * 64)]
            assert np.abs(px - np.array(COLORS[o["color"]])).max() < 60, (s["__key__"], o, px)
    assert counts == {1, 2, 3}


def test_colours_contrast_with_backgrounds():
    for c in COLORS.values():
        for b in BACKGROUNDS.values():
            assert np.linalg.norm(np.subtract(c, b)) > 90


def test_deterministic_by_seed_and_independent_of_shard_size(small, tmp_path):
    again = tmp_path / "again"
    make_demo_data(again, DemoDataConfig(**vars(SMALL)), show_progress=False)
    for split in ("train", "val"):
        a, b = list_shards(small / split), list_shards(again / split)
        assert [atomic.sha256_file(p) for p in a] == [atomic.sha256_file(p) for p in b]
    resharded = tmp_path / "resharded"
    make_demo_data(resharded, DemoDataConfig(**{**vars(SMALL), "shard_size": 1000}), show_progress=False)
    assert [s["jpg"] for s in read_split(resharded / "train")] == [s["jpg"] for s in read_split(small / "train")]
    other = tmp_path / "other"
    make_demo_data(other, DemoDataConfig(**{**vars(SMALL), "seed": 8}), show_progress=False)
    assert read_split(other / "train")[0]["json"] != read_split(small / "train")[0]["json"]


def test_crash_leaves_no_partial_shard_and_rerun_completes(tmp_path, monkeypatch):
    out = tmp_path / "data"
    real = demo_data.make_sample

    def failing(split, index, cfg):
        if split == "train" and index == 70:
            raise RuntimeError("disk full")
        return real(split, index, cfg)

    monkeypatch.setattr(demo_data, "make_sample", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        make_demo_data(out, DemoDataConfig(**vars(SMALL)), show_progress=False)
    # the finished first shard is whole; the one in progress left nothing behind; no completion marker
    assert [p.name for p in list_shards(out / "train")] == ["shard-000000.tar"]
    assert len(read_split(out / "train")) == 50
    assert not list(out.rglob(".tmp-*")) and not (out / "info.json").exists()
    assert not demo_data.is_complete(out)

    monkeypatch.setattr(demo_data, "make_sample", real)
    info = make_demo_data(out, DemoDataConfig(**vars(SMALL)), show_progress=False)
    assert not info.get("skipped") and len(read_split(out / "train")) == 120


def test_rerun_skips_and_other_settings_need_overwrite(small, tmp_path):
    mtimes = {p: p.stat().st_mtime_ns for p in small.rglob("*.tar")}
    info = make_demo_data(small, DemoDataConfig(**vars(SMALL)), show_progress=False)
    assert info["skipped"] and {p: p.stat().st_mtime_ns for p in small.rglob("*.tar")} == mtimes

    out = tmp_path / "d"
    make_demo_data(out, DemoDataConfig(n=20, val_n=5, seed=1), show_progress=False)
    with pytest.raises(DemoDataError, match="other settings"):
        make_demo_data(out, DemoDataConfig(n=10, val_n=5, seed=1), show_progress=False)
    info = make_demo_data(out, DemoDataConfig(n=10, val_n=5, seed=1), overwrite=True, show_progress=False)
    assert info["splits"]["train"]["n"] == 10 and len(read_split(out / "train")) == 10


def test_bad_settings_rejected():
    for bad in ({"n": 0}, {"image_size": 8}, {"min_objects": 3, "max_objects": 2}, {"image_format": "gif"}):
        with pytest.raises(DemoDataError):
            DemoDataConfig(**bad).validate()


def test_cli_png_and_sizes(tmp_path):
    out = tmp_path / "cli"
    rc = main(["make-demo-data", str(out), "--n", "12", "--val-n", "4", "--image-size", "32",
               "--shard-size", "5", "--format", "png", "--max-objects", "1", "--seed", "3", "--preview"])
    assert rc == 0
    preview = Image.open(out / "preview.png")
    assert preview.format == "PNG" and preview.width > 300
    train = read_split(out / "train")
    assert len(list_shards(out / "train")) == 3 and len(train) == 12
    for s in train:
        assert Image.open(io.BytesIO(s["png"])).size == (32, 32)
        assert len(json.loads(s["json"])["objects"]) == 1
