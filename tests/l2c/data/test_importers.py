"""`make-shards --format NAME`: each official evaluation layout, written as the set ships it, over real photos.

Fixtures use the sets' own file names and field names (microsoft/LLM2CLIP `llm2clip/data/setup_eval_datasets.sh`,
`llm2clip/data/extract_eval_embedding.py`, `llm2clip/training/data.py`) with photos from ../shared/data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from l2c.cli import main
from l2c.data import importers
from l2c.data.make_shards import MakeShardsConfig, MakeShardsError, make_shards
from l2c.data.writer import list_shards
from tests.eval.suite_fixtures import link


@pytest.fixture(scope="module")
def coco(shared_data) -> tuple[Path, list[dict]]:
    d = shared_data / "coco_mini_val2017"
    recs = [json.loads(x) for x in (d / "captions.jsonl").read_text().splitlines() if x.strip()]
    return d, recs


@pytest.fixture(scope="module")
def flickr(shared_data) -> tuple[Path, list[dict]]:
    d = shared_data / "flickr8k_dev_photos"
    recs = [json.loads(x) for x in (d / "captions.jsonl").read_text().splitlines() if x.strip()]
    return d, recs


def samples(out: Path) -> dict[str, dict]:
    got = list(wds.WebDataset([str(p) for p in list_shards(out)], shardshuffle=False))
    return {s["__key__"]: {"txt": s["txt"].decode(), "json": json.loads(s["json"]), "image": s.get("jpg")} for s in got}


def run(*args: str) -> int:
    return main(["make-shards", *args])


def info_of(out: Path) -> dict:
    return json.loads((out / "info.json").read_text())


# ------------------------------------------------------------------------------------------- karpathy


def coco_karpathy(coco, root: Path) -> dict:
    """dataset_coco.json over val2014/COCO_val2014_<12 digits>.jpg: 4 test (one without sentences, one whose
    image is absent), 3 train, 2 restval, 1 val; plus one image in the folder that the file does not list."""
    d, recs = coco
    images, sentid = [], 0
    splits = ["test"] * 4 + ["train"] * 3 + ["restval"] * 2 + ["val"]
    for i, (r, split) in enumerate(zip(recs, splits, strict=False)):
        name = f"COCO_val2014_{r['image_id']:012d}.jpg"
        if i != 3:  # test image 3 is listed but not on disk
            link(d / r["file"], root / "val2014" / name)
        caps = [] if i == 2 else r["captions"]
        sents = [{"tokens": c.lower().split(), "raw": c, "imgid": i, "sentid": sentid + j} for j, c in enumerate(caps)]
        images.append({"filepath": "val2014", "sentids": [s["sentid"] for s in sents], "filename": name, "imgid": i,
                       "split": split, "sentences": sents, "cocoid": r["image_id"]})
        sentid += len(sents)
    link(d / recs[20]["file"], root / "val2014" / "COCO_val2014_999999999999.jpg")  # listed nowhere
    ann = root / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"ann": ann, "images": images}


def test_karpathy_coco_test_split(coco, tmp_path):
    root = tmp_path / "coco"
    fx = coco_karpathy(coco, root)
    out = tmp_path / "out"
    assert run(str(root), "--format", "karpathy", "--captions", str(fx["ann"]), "--out", str(out)) == 0
    info = info_of(out)
    assert info["records"] == 4 and info["written"] == 2 and info["selected_out"] == 6
    assert info["rejected_by_reason"] == {"no_captions": 1, "missing_file": 1, "unreferenced_image": 1}
    got = samples(out)
    d, recs = coco
    assert set(got) == {str(recs[0]["image_id"]), str(recs[1]["image_id"])}
    for i in (0, 1):
        s = got[str(recs[i]["image_id"])]
        assert s["txt"] == recs[i]["captions"][0].strip()
        assert s["json"]["captions"] == [c.strip() for c in recs[i]["captions"]]
        assert s["json"]["split"] == "test" and s["json"]["cocoid"] == recs[i]["image_id"]
        assert s["json"]["sentids"] == fx["images"][i]["sentids"]
        assert s["image"] == (d / recs[i]["file"]).read_bytes()
    # a rerun finds the output complete; another subset into the same place needs --overwrite
    assert run(str(root), "--format", "karpathy", "--captions", str(fx["ann"]), "--out", str(out)) == 0
    assert info_of(out) == info
    assert run(str(root), "--format", "karpathy", "--subset", "val", "--captions", str(fx["ann"]), "--out", str(out)) == 2
    # the training splits the way they are usually taken: train + restval; test/val images are not rejects
    out2 = tmp_path / "train"
    assert run(str(root), "--format", "karpathy", "--subset", "train,restval", "--captions", str(fx["ann"]),
               "--out", str(out2)) == 0
    info2 = info_of(out2)
    assert info2["written"] == 5 and info2["selected_out"] == 5
    assert info2["rejected_by_reason"] == {"unreferenced_image": 1}
    assert {s["json"]["split"] for s in samples(out2).values()} == {"train", "restval"}


def test_karpathy_flickr30k(flickr, tmp_path):
    """dataset_flickr30k.json: no filepath, images in flickr30k-images/, key = the file-name stem."""
    d, recs = flickr
    root = tmp_path / "flickr30k-images"
    images = []
    for i, r in enumerate(recs[:6]):
        link(d / r["file_name"], root / r["file_name"])
        images.append({"sentids": list(range(5 * i, 5 * i + 5)), "imgid": i, "filename": r["file_name"],
                       "split": "test" if i < 4 else "train",
                       "sentences": [{"tokens": c.split(), "raw": c, "imgid": i, "sentid": 5 * i + j}
                                     for j, c in enumerate(r["captions"])]})
    ann = tmp_path / "dataset_flickr30k.json"
    ann.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    out = tmp_path / "out"
    assert run(str(root), "--format", "karpathy", "--captions", str(ann), "--out", str(out)) == 0
    info = info_of(out)
    assert info["written"] == 4 and info["rejected"] == 0 and info["selected_out"] == 2
    got = samples(out)
    assert set(got) == {r["image_id"] for r in recs[:4]}
    assert all(len(s["json"]["captions"]) == 5 for s in got.values())


# ------------------------------------------------------------------------------------- retrieval-json


def test_retrieval_json_blip_test_file(coco, tmp_path):
    """coco_karpathy_test.json (what setup_eval_datasets.sh downloads): [{"image": "val2014/...", "caption": [...]}];
    it names only the test images, so other images in the root are not reported."""
    d, recs = coco
    root = tmp_path / "images"
    items = []
    for r in recs[:5]:
        name = f"val2014/COCO_val2014_{r['image_id']:012d}.jpg"
        link(d / r["file"], root / name)
        items.append({"image": name, "caption": r["captions"]})
    link(d / recs[9]["file"], root / "train2014" / "COCO_train2014_000000000009.jpg")  # another split's image
    items.append({"image": "val2014/COCO_val2014_000000000001.jpg", "caption": ["absent"]})
    ann = tmp_path / "coco_karpathy_test.json"
    ann.write_text(json.dumps(items))
    out = tmp_path / "out"
    assert run(str(root), "--format", "retrieval-json", "--captions", str(ann), "--out", str(out)) == 0
    info = info_of(out)
    assert info["written"] == 5 and info["rejected_by_reason"] == {"missing_file": 1}
    got = samples(out)
    key = f"val2014_COCO_val2014_{recs[0]['image_id']:012d}"
    assert got[key]["txt"] == recs[0]["captions"][0].strip()
    assert got[key]["json"]["image"] == f"val2014/COCO_val2014_{recs[0]['image_id']:012d}.jpg"


# ----------------------------------------------------------------------------------------- sharegpt4v


def sharegpt_item(i: int, image: str, caption: str) -> dict:
    return {"id": image.rsplit("/", 1)[-1].split(".")[0], "image": image,
            "conversations": [{"from": "human", "value": "<image>\nAnalyze the image in a comprehensive and detailed manner."},
                              {"from": "gpt", "value": caption}]}


def test_sharegpt4v_takes_first_1000_by_default(tmp_path):
    items = [sharegpt_item(i, f"sam/images/sa_{i}.jpg", f"caption {i}") for i in range(1002)]
    ann = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    ann.write_text(json.dumps(items))
    src = importers.load_source(tmp_path, ann, MakeShardsConfig(format="sharegpt4v"))
    assert len(src.records) == 1000 and src.selected_out == 2 and not src.scan_unreferenced
    n, rec = src.records[-1]
    assert n == 1000 and rec["key"] == "sam_images_sa_999" and rec["captions"] == "caption 999"


def test_sharegpt4v_shards(coco, tmp_path):
    d, recs = coco
    root = tmp_path / "sharegpt4v"
    items = []
    for r in recs[:4]:
        name = f"coco/train2017/{r['image_id']:012d}.jpg"
        link(d / r["file"], root / name)
        items.append(sharegpt_item(0, name, " ".join(r["captions"])))
    items.append({"id": "x", "image": "coco/train2017/000000000777.jpg", "conversations": [{"from": "human"}]})
    items.append(sharegpt_item(0, "coco/train2017/not_taken.jpg", "past the first N"))
    ann = root / "share-captioner_coco_lcs_sam_1246k_1107.json"
    ann.write_text(json.dumps(items))
    out = tmp_path / "out"
    assert run(str(root), "--format", "sharegpt4v", "--subset", "5", "--captions", str(ann), "--out", str(out)) == 0
    info = info_of(out)
    assert info["records"] == 5 and info["written"] == 4 and info["selected_out"] == 1
    assert info["rejected_by_reason"] == {"no_captions": 1}
    got = samples(out)
    key = f"coco_train2017_{recs[0]['image_id']:012d}"
    assert got[key]["txt"] == " ".join(recs[0]["captions"]).strip()
    assert got[key]["json"]["id"] == f"{recs[0]['image_id']:012d}" and "conversations" not in got[key]["json"]


# -------------------------------------------------------------------------------------------- urban1k


def test_urban1k_folder(flickr, tmp_path):
    """Urban1k/image/N.jpg + Urban1k/caption/N.txt; caption = the first line (as the official code reads it)."""
    d, recs = flickr
    root = tmp_path / "Urban1k"
    (root / "caption").mkdir(parents=True)
    for i in range(1, 6):
        link(d / recs[i]["file_name"], root / "image" / f"{i}.jpg")
        if i != 5:
            (root / "caption" / f"{i}.txt").write_text(" ".join(recs[i]["captions"]) + "\nsecond line\n")
    (root / "caption" / "6.txt").write_text("a caption whose image is missing\n")
    out = tmp_path / "out"
    assert run(str(root), "--format", "urban1k", "--out", str(out)) == 0
    info = info_of(out)
    assert info["records"] == 6 and info["written"] == 4
    assert info["rejected_by_reason"] == {"no_captions": 1, "missing_file": 1}
    got = samples(out)
    assert sorted(got, key=int) == ["1", "2", "3", "4"]
    assert got["2"]["txt"] == " ".join(recs[2]["captions"])
    assert got["2"]["json"]["caption_file"] == "caption/2.txt"
    assert got["2"]["image"] == (d / recs[2]["file_name"]).read_bytes()


# ---------------------------------------------------------------------------------------------- docci


def test_docci_test_split(flickr, tmp_path):
    d, recs = flickr
    root = tmp_path / "docci" / "images"
    lines = []
    for i, r in enumerate(recs[:7]):
        split = "test" if i < 4 else ("train" if i < 6 else "qual_dev")
        ex = f"{split}_{i:05d}"
        link(d / r["file_name"], root / f"{ex}.jpg")
        lines.append(json.dumps({"example_id": ex, "split": split, "image_file": f"{ex}.jpg",
                                 "description": " ".join(r["captions"])}))
    lines.insert(2, '{"example_id": "test_99999", "split": ')  # a broken line is counted
    ann = tmp_path / "docci" / "docci_descriptions.jsonlines"
    ann.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run(str(root), "--format", "docci", "--captions", str(ann), "--out", str(out)) == 0
    info = info_of(out)
    assert info["written"] == 4 and info["selected_out"] == 3
    assert info["rejected_by_reason"] == {"bad_json": 1}  # train/qual_dev images are not unreferenced
    got = samples(out)
    assert sorted(got) == [f"test_{i:05d}" for i in range(4)]
    assert got["test_00001"]["txt"] == " ".join(recs[1]["captions"])
    assert got["test_00001"]["json"]["split"] == "test" and "description" not in got["test_00001"]["json"]


# ------------------------------------------------------------------------------------------- imagenet


def test_imagenet_class_folders(flickr, tmp_path):
    d, recs = flickr
    root = tmp_path / "val"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for c, wnid in enumerate(wnids):
        for j in range(2):
            r = recs[2 * c + j]
            link(d / r["file_name"], root / wnid / f"ILSVRC2012_val_{2 * c + j:08d}.JPEG")
    (root / "stray.jpg").symlink_to(d / recs[10]["file_name"])  # not in a class folder
    names = tmp_path / "classnames.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")
    out = tmp_path / "out"
    assert run(str(root), "--format", "imagenet", "--captions", str(names), "--out", str(out)) == 0
    info = info_of(out)
    assert info["written"] == 6 and info["rejected_by_reason"] == {"unreferenced_image": 1}
    got = samples(out)
    s = got["n01443537_ILSVRC2012_val_00000002"]
    assert s["txt"] == "goldfish" and s["json"]["label"] == 1 and s["json"]["class_name"] == "goldfish"
    # LOC_synset_mapping.txt style: "<folder> <name>" lines
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                       "n01484850 great white shark, white shark\n")
    src = importers.load_source(root, mapping, MakeShardsConfig(format="imagenet"))
    assert {r["class_name"] for _, r in src.records} == {"tench, Tinca tinca", "goldfish, Carassius auratus",
                                                          "great white shark, white shark"}
    names.write_text("tench\ngoldfish\n")
    with pytest.raises(MakeShardsError, match="2 class names but .* 3 class folders"):
        make_shards(root, names, tmp_path / "bad", MakeShardsConfig(format="imagenet"), show_progress=False)


# --------------------------------------------------------------------------------------------- xm3600


def test_xm3600_language(coco, tmp_path):
    d, recs = coco
    root = tmp_path / "xm3600"
    lines = []
    for i, r in enumerate(recs[:3]):
        key = f"{r['image_id']:016x}"
        link(d / r["file"], root / "images" / f"{key}.jpg")
        rec = {"image/key": key, "image/locale": "en"}
        for lang in ("en", "de"):
            caps = [f"{lang}: {c}" for c in r["captions"][:2]]
            rec[lang] = {"caption": caps, "caption/tokenized": caps, "caption/tokenized/lowercase": [c.lower() for c in caps]}
        if i == 2:
            del rec["de"]
        lines.append(json.dumps(rec))
    ann = root / "captions.jsonl"
    ann.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run(str(root / "images"), "--format", "xm3600", "--captions", str(ann), "--out", str(out)) == 0
    got = samples(out)
    key = f"{recs[0]['image_id']:016x}"
    assert len(got) == 3 and got[key]["txt"] == f"en: {recs[0]['captions'][0].strip()}"
    out_de = tmp_path / "out_de"
    assert run(str(root / "images"), "--format", "xm3600", "--subset", "de", "--captions", str(ann),
               "--out", str(out_de)) == 0
    info = info_of(out_de)
    assert info["written"] == 2 and info["rejected_by_reason"] == {"no_captions": 1}
    assert samples(out_de)[key]["json"]["language"] == "de"


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    assert run(str(tmp_path), "--format", "laion", "--captions", str(tmp_path / "x"), "--out", str(tmp_path / "o")) == 2
    assert "unknown --format" in capsys.readouterr().err
