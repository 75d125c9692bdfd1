"""make-shards on a Flickr-style JSONL (`{"file_name", "captions"}`, issue #15 row 8): keys from file names, a
non-zero exit when nothing was written, train / held-out parts without the other part's images as rejects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import webdataset as wds

from l2c.cli import main
from l2c.data.writer import list_shards

ROOT = Path(__file__).resolve().parents[3]
N = 40


@pytest.fixture(scope="module")
def flickr_style(shared_data, tmp_path_factory) -> Path:
    """40 real Flickr8k dev photos and a JSONL in the form the issue names: only file_name and captions."""
    src = shared_data / "flickr8k_dev_photos"
    recs = [json.loads(x) for x in (src / "captions.jsonl").read_text().splitlines() if x.strip()][:N]
    d = tmp_path_factory.mktemp("flickr_style")
    for r in recs:
        (d / r["file_name"]).symlink_to(src / r["file_name"])
    (d / "captions.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"], "captions": r["captions"]}) + "\n"
                                              for r in recs))
    return d


def keys(out: Path) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset([str(p) for p in list_shards(out)], shardshuffle=False)]


def test_nothing_written_exits_nonzero(flickr_style, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["make-shards", str(flickr_style), "--captions", str(flickr_style / "captions.jsonl"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "wrote nothing" in err and "--key-field" in err
    # with the file-name field but keys taken from it as is: the dots make every key invalid, and it says so
    assert main(["make-shards", str(flickr_style), "--captions", str(flickr_style / "captions.jsonl"),
                 "--out", str(tmp_path / "out2"), "--image-field", "file_name", "--key-field", "file_name"]) == 2
    assert "invalid_key" in capsys.readouterr().err


def test_key_from_file_name(flickr_style, tmp_path):
    out = tmp_path / "out"
    assert main(["make-shards", str(flickr_style), "--captions", str(flickr_style / "captions.jsonl"), "--out",
                 str(out), "--image-field", "file_name", "--key-from-file-name"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["written"] == N and info["rejected"] == 0
    names = sorted(p.stem for p in flickr_style.glob("*.jpg"))
    assert sorted(keys(out)) == names


def test_split_parts_are_disjoint_and_not_rejects(flickr_style, tmp_path):
    out = tmp_path / "out"
    assert main(["make-shards", str(flickr_style), "--captions", str(flickr_style / "captions.jsonl"), "--out",
                 str(out), "--image-field", "file_name", "--key-from-file-name",
                 "--split", "train=0.75", "--split", "val=0.25"]) == 0
    train, val = json.loads((out / "train" / "info.json").read_text()), json.loads((out / "val" / "info.json").read_text())
    assert train["rejected"] == val["rejected"] == 0  # the other part's images are not unreferenced
    assert train["written"] + val["written"] == N and train["written"] > val["written"] > 0
    assert train["selected_out"] == val["written"] and val["selected_out"] == train["written"]
    tk, vk = set(keys(out / "train")), set(keys(out / "val"))
    assert not tk & vk and tk | vk == {p.stem for p in flickr_style.glob("*.jpg")}
    # the assignment is a function of the key: a rerun into a new place gives the same parts
    again = tmp_path / "again"
    main(["make-shards", str(flickr_style), "--captions", str(flickr_style / "captions.jsonl"), "--out",
          str(again), "--image-field", "file_name", "--key-from-file-name", "--split", "train=0.75,val=0.25"])
    assert set(keys(again / "val")) == vk


def test_select_file(flickr_style, tmp_path, capsys):
    names = sorted(p.name for p in flickr_style.glob("*.jpg"))
    sel = tmp_path / "heldout.txt"
    sel.write_text("# held-out images\n" + "\n".join(names[:5]) + "\nno_such_image.jpg\n")
    out = tmp_path / "out"
    assert main(["make-shards", str(flickr_style), "--captions", str(flickr_style / "captions.jsonl"), "--out",
                 str(out), "--image-field", "file_name", "--key-from-file-name", "--select", str(sel)]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["written"] == 5 and info["rejected"] == 0 and info["selected_out"] == N - 5
    assert info["select_missing"] == 1
    assert sorted(keys(out)) == [n[:-4] for n in names[:5]]
    assert "named no record" in capsys.readouterr().out


def test_reference_documents_converted_fields_and_formats():
    text = (ROOT / "docs" / "reference.md").read_text()
    section = text[text.index("## `l2c make-shards`"):]
    section = section[: section.index("\n## ")]
    assert re.search(r"`txt`[^\n]*first caption", section)
    assert re.search(r"`json:long_caption`[^\n]*all captions[^\n]*joined", section)
    for flag in ("--key-from-file-name", "--split", "--select", "--subset"):
        assert flag in section
    for fmt in ("karpathy", "retrieval-json", "sharegpt4v", "urban1k", "docci", "imagenet", "xm3600"):
        assert f"`{fmt}`" in section
    for official in ("dataset_coco.json", "dataset_flickr30k.json", "share-captioner_coco_lcs_sam_1246k_1107.json",
                     "docci_descriptions.jsonlines", "coco_karpathy_test.json"):
        assert official in section
