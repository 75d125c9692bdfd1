"""`l2c eval-suite`: the official sets in their own layouts (real photos), one run, reruns that reuse the caches,
results equal to `eval-retrieval` on the same shards and cache, `--compare`, and the shipped suite config."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from l2c.cli import main
from l2c.eval.suite import load_suite, read_classnames
from l2c.eval.zeroshot import load_templates
from tests.eval.suite_fixtures import write_docci, write_imagenet, write_urban1k
from tests.eval.test_zeroshot import minilm_model  # noqa: F401  (fixture: tiny export on the packaged MiniLM)
from tests.l2c.data.test_importers import coco, coco_karpathy, flickr  # noqa: F401  (fixtures, writers)


def test_shipped_suite_config_and_data_files():
    cfg, base = load_suite("eval/llm2clip")
    assert [s.name for s in cfg.sets] == ["flickr30k", "coco", "sharegpt4v", "urban1k", "docci", "imagenet"]
    assert [s.name for s in cfg.sets if s.cra] == ["coco"] and cfg.ks == [1, 5, 10]
    assert {lay.format for s in cfg.sets for lay in s.layouts} == {
        "karpathy", "retrieval-json", "sharegpt4v", "urban1k", "docci", "imagenet"}
    ids, names = read_classnames(base / cfg.zeroshot.classnames)
    assert len(ids) == 1000 and ids == sorted(ids) and (ids[0], names[0]) == ("n01440764", "tench")
    assert names[-1] == "toilet paper"
    templates = load_templates(base / cfg.zeroshot.templates)
    assert len(templates) == 80 and templates[0] == "a bad photo of a {}."


@pytest.fixture(scope="module")
def suite_data(coco, flickr, tmp_path_factory):  # noqa: F811
    """DIR with coco (Karpathy), Urban1k, docci, imagenet in their layouts; sharegpt4v without its annotation;
    no flickr30k. The suite is the shipped one, with every Karpathy split of the small COCO file and a short
    class list and two templates for zero-shot (1,000 classes × 80 templates is for real runs)."""
    root = tmp_path_factory.mktemp("suite")
    data = root / "data"
    coco_karpathy(coco, data / "coco")
    write_urban1k(flickr, data / "Urban1k")
    write_docci(flickr, data / "docci")
    write_imagenet(flickr, data / "imagenet")
    (data / "sharegpt4v" / "sam").mkdir(parents=True)
    cfg, base = load_suite("eval/llm2clip")
    shipped = yaml.safe_load((base / "llm2clip.yaml").read_text())
    for s in shipped["sets"]:
        if s["name"] == "coco":
            s["layouts"][0]["subset"] = "all"
    ids, names = read_classnames(base / cfg.zeroshot.classnames)
    (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in list(zip(ids, names, strict=True))[:8]))
    (root / "templates.txt").write_text("a photo of a {}.\nitap of a {}.\n")
    shipped["zeroshot"].update(classnames=str(root / "classes.txt"), templates=str(root / "templates.txt"))
    (root / "suite.yaml").write_text(yaml.safe_dump(shipped))
    return data, root / "suite.yaml"


def test_eval_suite_end_to_end(suite_data, minilm_model, ray_local, tmp_path, refused):  # noqa: F811
    data, suite = suite_data
    root, settings = minilm_model
    model = root / "run"
    out = tmp_path / "out"
    args = ["eval-suite", "--model", str(model), "--data", str(data), "--out", str(out), "--suite", str(suite)]
    assert main(args) == 0
    res = json.loads((out / "suite.json").read_text())
    assert set(res["sets"]) == {"coco", "urban1k", "docci", "imagenet"}
    assert set(res["skipped"]) == {"flickr30k", "sharegpt4v"}
    assert "no folder" in res["skipped"]["flickr30k"]
    assert "share-captioner_coco_lcs_sam_1246k_1107.json" in res["skipped"]["sharegpt4v"]
    assert res["n_embedded"] == 3 and res["n_shards_made"] == 4

    # every retrieval set: what eval-retrieval gives on the same shards and cache
    for name, n_images in (("coco", 8), ("urban1k", 5), ("docci", 4)):
        got = res["sets"][name]
        assert got["n_images"] == n_images and got["text_cache"]["embedded"] is True
        er = tmp_path / "er" / name
        assert main(["eval-retrieval", "--model", str(model), "--images", str(out / "shards" / name),
                     "--text-cache", str(out / "text" / name), "--out", str(er)]) == 0
        ref = json.loads((er / "eval.json").read_text())
        for direction in ("image_to_text", "text_to_image"):
            assert set(got[direction]) == {"R@1", "R@5", "R@10"}
            assert got[direction] == ref[direction], (name, direction)
        assert got["n_texts"] == ref["n_texts"]
    # the caches hold the model's own teacher vectors (same fingerprint, fields as configured)
    manifest = json.loads((out / "text" / "coco" / "manifest.json").read_text())
    assert manifest["settings"]["model_fingerprint"] == settings["model_fingerprint"]
    assert manifest["settings"]["fields"] == ["json:captions[*]"]
    assert res["sets"]["coco"]["n_texts"] == 8 * 5
    cra = res["sets"]["coco"]["cra"]
    assert cra["n"] == 8 and 0 <= cra["cra_top1"] <= cra["cra_top5"] <= 100
    zs = res["sets"]["imagenet"]["zeroshot"]
    assert zs["n_images"] == 6 and zs["n_classes"] == 8 and zs["n_templates"] == 2 and zs["top1"] is not None

    md = (out / "suite.md").read_text()
    header = ("| model | Flickr30k 1k I2T | Flickr30k 1k T2I | COCO 5k I2T | COCO 5k T2I | ShareGPT4V 1k I2T | "
              "ShareGPT4V 1k T2I | Urban-1k I2T | Urban-1k T2I | DOCCI I2T | DOCCI T2I | ImageNet top-1 |")
    assert header in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| run |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[:2] == ["—", "—"] and cells[2] == f"{res['sets']['coco']['image_to_text']['R@1']:.2f}"
    assert cells[-1] == f"{zs['top1']:.2f}"
    assert "`flickr30k`: no folder" in md and (out / "suite.png").stat().st_size > 1000

    # rerun against another run's results: nothing converted or embedded again, caches untouched
    stamp = {p: p.stat().st_mtime_ns for p in (out / "text").rglob("*") if p.is_file()}
    other = tmp_path / "other"
    other.mkdir()
    before = json.loads((out / "suite.json").read_text())
    before["model_name"] = "baseline"
    before["sets"]["coco"]["image_to_text"]["R@1"] -= 10.0
    before["sets"]["imagenet"]["zeroshot"]["top1"] -= 5.0
    del before["sets"]["docci"]
    (other / "suite.json").write_text(json.dumps(before))
    assert main([*args, "--compare", str(other)]) == 0
    again = json.loads((out / "suite.json").read_text())
    assert again["n_embedded"] == 0 and again["n_shards_made"] == 0
    assert all(not e["text_cache"]["embedded"] for e in again["sets"].values() if "text_cache" in e)
    assert {p: p.stat().st_mtime_ns for p in (out / "text").rglob("*") if p.is_file()} == stamp
    assert again["sets"]["coco"]["image_to_text"] == res["sets"]["coco"]["image_to_text"]
    diff = again["compare"]["diff"]
    assert set(diff) == {"coco", "urban1k", "imagenet"}
    assert diff["coco"]["image_to_text/R@1"] == pytest.approx(10.0)
    assert diff["coco"]["text_to_image/R@1"] == 0.0 and diff["imagenet"]["zeroshot/top1"] == pytest.approx(5.0)
    md = (out / "suite.md").read_text()
    assert "| baseline |" in md and "| Δ (run − baseline) |" in md
    delta = next(ln for ln in md.splitlines() if ln.startswith("| Δ"))
    assert [c.strip() for c in delta.strip("|").split("|")][3] == "+10.00"

    # shards changed since the cache was made (same names, new files): that set is embedded again
    from l2c.eval.suite import ensure_cache
    from l2c.meta import ModelMeta

    meta = ModelMeta.from_dict(json.loads((model / "export" / "l2c_model.json").read_text()))
    tar = next((out / "shards" / "docci").glob("*.tar"))
    fields = ["json:captions[*]"]
    assert not ensure_cache(out / "shards" / "docci", out / "text" / "docci", fields, meta, False)["embedded"]
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    assert ensure_cache(out / "shards" / "docci", out / "text" / "docci", fields, meta, False)["embedded"]

    # bad input: one line, exit 2
    refused([*args[:4], str(tmp_path / "nowhere"), *args[5:]], "is not a directory")
    refused([*args, "--compare", str(tmp_path / "nowhere")], "no suite.json there")


def test_sets_given_as_shards_or_unconvertible(tmp_path):
    """A set folder holding shards is used as it is; a layout that cannot be read is skipped with the reason."""
    from eval_reference import write_shards

    from l2c.eval.suite import find_shards

    cfg, base = load_suite("eval/llm2clip")
    spec = {s.name: s for s in cfg.sets}
    data, out = tmp_path / "data", tmp_path / "out"
    write_shards(data / "docci", n_shards=1, per_shard=2)
    shards, info = find_shards(spec["docci"], data, out, None)
    assert shards == data / "docci" and info["source"] == "shards" and not info["made"]
    (data / "coco").mkdir()
    (data / "coco" / "dataset_coco.json").write_text("{not json")
    shards, info = find_shards(spec["coco"], data, out, None)
    assert shards is None and "karpathy layout" in info["skipped"] and "not a JSON file" in info["skipped"]
    shards, info = find_shards(spec["urban1k"], data, out, None)
    assert shards is None and info["skipped"].startswith("no folder")
