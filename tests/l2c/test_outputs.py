"""Nothing a command did not write is ever removed: every `--out` is a new path, an empty folder or the same
command's earlier output; a file, the current directory, a folder of other files, a run directory, a cache
or a folder inside one is refused with one line before any work, and is left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from l2c.cli import main
from l2c.outputs import MARKER, OutputRefused, check, what_is

TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` (hidden ones too) with its sha256: equal snapshots, nothing touched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A train-vision run directory as the trainer leaves it: config.yaml, checkpoints/, metrics, export/."""
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.export import export_model
    from l2c.trainer.vision.model import L2CModel
    from l2c.trainer.vision.tower import build_vision_tower

    run = tmp_path_factory.mktemp("outputs") / "run"
    torch.manual_seed(0)
    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_CLIP)))
    export_model(L2CModel(tower, spec, text_dim=16, embed_dim=24), run / "export", proc, None, ["txt"])
    (run / "config.yaml").write_text("steps: 2\n")
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "checkpoint.json").write_text('{"step": 2}\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.1}\n{"step": 2, "loss": 3.9}\n')
    return run


MINE = {"notes.txt": b"mine\n", "photo.jpg": b"\xff\xd8not really"}


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    for name, data in MINE.items():
        (path / name).write_bytes(data)
    return path


def refuses_a_file_and_a_folder_of_others(refused, cmd: list, tmp_path: Path, command: str) -> Path:
    """`cmd --out X` is refused for X a file and for a folder of the user's files, both left as they were;
    returns that folder."""
    a_file = tmp_path / "kept.bin"
    a_file.write_bytes(b"bytes I keep")
    refused([*cmd, "--out", a_file], rf"--out .*kept.bin is a file \(12 bytes\): {command} writes a folder")
    mine = user_folder(tmp_path / "mine")
    refused([*cmd, "--out", mine], rf"holds 2 entries {command} did not write \(notes.txt, photo.jpg\)")
    assert a_file.read_bytes() == b"bytes I keep"
    assert snapshot(mine) == {n: hashlib.sha256(d).hexdigest() for n, d in MINE.items()}
    return mine


@pytest.mark.parametrize("fmt", ["llm2clip-hf", "open_clip"])
def test_export_out_rule(fmt, run_dir, refused, tmp_path, monkeypatch):
    run_before = snapshot(run_dir)
    refuses_a_file_and_a_folder_of_others(refused, ["export", run_dir, "--format", fmt], tmp_path, "export")
    export = ["export", run_dir, "--format", fmt, "--out"]
    refused([*export, run_dir], r"is a run directory \(config.yaml, checkpoints/")
    refused([*export, run_dir / "export"], r"is inside a run directory .* at .*run")
    refused([*export, run_dir / "hf"], r"is inside a run directory")
    assert snapshot(run_dir) == run_before and not (run_dir / "hf").exists()

    here = user_folder(tmp_path / "here")
    monkeypatch.chdir(here)
    refused([*export, "."], r"--out \. is the current directory")
    refused([*export, ".."], r"--out \.\. is a folder above the current directory")
    assert sorted(os.listdir(here)) == ["notes.txt", "photo.jpg"] and snapshot(run_dir) == run_before

    new = tmp_path / "exported"
    assert main([str(a) for a in [*export, new]]) == 0
    first = snapshot(new)
    assert json.loads((new / MARKER).read_text())["command"] == "export"
    assert main([str(a) for a in [*export, new]]) == 0  # its own earlier export: replaced when complete
    assert set(snapshot(new)) == set(first) and snapshot(run_dir) == run_before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(a) for a in [*export, empty]]) == 0
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_exported_files_follow_the_umask(run_dir, tmp_path):
    """save_pretrained and safetensors write private files (0600); every published file gets the umask's mode."""
    old = os.umask(0o022)
    try:
        assert main(["export", str(run_dir), "--format", "llm2clip-hf", "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o755


def test_make_shards_out_rule(refused, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(images / "a.jpg")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image_id": "a", "file": "a.jpg", "captions": ["a red square"]}) + "\n")
    mine = refuses_a_file_and_a_folder_of_others(refused, ["make-shards", images, "--captions", captions], tmp_path,
                                                 "make-shards")  # fmt: skip
    cmd = ["make-shards", images, "--captions", captions, "--out"]
    refused([*cmd, mine, "--split", "train=0.5", "--split", "val=0.5"], r"holds 2 entries make-shards")
    assert sorted(os.listdir(mine)) == ["notes.txt", "photo.jpg"]
    out = tmp_path / "shards"
    assert main([str(a) for a in [*cmd, out]]) == 0 and (out / "shard-000000.tar").exists()
    assert main([str(a) for a in [*cmd, out, "--overwrite"]]) == 0  # its own output
    (out / MARKER).unlink()  # an output made before the marker: only names make-shards writes
    assert main([str(a) for a in [*cmd, out]]) == 0


def test_embed_out_rule(refused, run_dir, tmp_path):
    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"image_id": "a", "caption": "a dog on grass"}) + "\n")
    cmd = ["embed-captions", captions, "--key-field", "image_id", "--text-field", "caption", "--model", "minilm",
           "--no-progress"]  # fmt: skip
    mine = refuses_a_file_and_a_folder_of_others(refused, cmd, tmp_path, "embed-captions")
    cmd.append("--out")
    refused([*cmd, run_dir / "cache"], r"is inside a run directory")
    cache = tmp_path / "a-cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"format": "l2c-text-cache", "shards": {}}) + "\n")
    refused([*cmd, cache / "sub"], r"is inside a text cache \(manifest.json\)")
    refused(["embed-images", captions, "--model", "x", "--no-progress", "--out", mine], r"holds 2 entries embed-images")
    assert sorted(os.listdir(mine)) == ["notes.txt", "photo.jpg"]
    assert not (run_dir / "cache").exists() and not (cache / "sub").exists()


@pytest.mark.parametrize("command", ["eval-retrieval", "eval-zeroshot", "eval-cra"])
def test_eval_out_rule(command, refused, run_dir, tmp_path):
    args = {"eval-retrieval": ["--model", run_dir, "--images", tmp_path / "x.tar", "--text-cache", tmp_path],
            "eval-zeroshot": ["--model", run_dir, "--images", tmp_path / "x.tar", "--classes", tmp_path / "c.txt"],
            "eval-cra": ["--text-cache", tmp_path]}[command]  # fmt: skip
    refuses_a_file_and_a_folder_of_others(refused, [command, *args], tmp_path, command)
    refused([command, *args, "--out", run_dir], r"is a run directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MARKER).write_text(json.dumps({"command": "export"}))
    refused([command, *args, "--out", tmp_path / "other"], r"holds the output of l2c export")


def test_eval_writes_again_into_its_own_output(tmp_path):
    """eval-cra twice into one --out (its marker), and into an output from before markers (eval.json only)."""
    import numpy as np

    from tests.eval.conftest import write_cache

    rng = np.random.default_rng(0)
    keys = [str(i) for i in range(12)]
    cache = write_cache(tmp_path / "cache", keys * 2, ["a"] * 12 + ["b"] * 12,
                        rng.standard_normal((24, 8)).astype(np.float32))  # fmt: skip
    out = tmp_path / "eval"
    for _ in range(2):
        assert main(["eval-cra", "--text-cache", str(cache), "--out", str(out)]) == 0
    assert json.loads((out / MARKER).read_text())["command"] == "eval-cra"
    old = tmp_path / "old-eval"
    old.mkdir()
    (old / "eval.json").write_text("{}\n")
    assert main(["eval-cra", "--text-cache", str(cache), "--out", str(old)]) == 0
    assert json.loads((old / "eval.json").read_text())["n"] == 12


def test_what_a_folder_is(tmp_path):
    ft = tmp_path / "ft"
    (ft / "adapters").mkdir(parents=True)
    (ft / "config.yaml").write_text("x: 1\n")
    assert what_is(ft) == "a run directory (config.yaml, adapters/)"
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.yaml").write_text("x: 1\n")  # a config alone is not a run
    assert what_is(tmp_path / "cfg-only") is None
    img = tmp_path / "img"
    img.mkdir()
    (img / "manifest.json").write_text(json.dumps({"format": "l2c-image-cache"}))
    assert what_is(img) == "an image cache (manifest.json)"
    assert check(img, "embed-images", cache_ok=True) == img.resolve()
    with pytest.raises(OutputRefused, match="is an image cache"):
        check(img, "make-shards")


def test_make_demo_data_out_rule(refused, tmp_path):
    mine = user_folder(tmp_path / "mine")
    refused(["make-demo-data", mine, "--n", "4", "--val-n", "0"], r"OUT .*mine holds 2 entries make-demo-data")
    (tmp_path / "classes.txt").write_text("my classes\n")
    refused(["make-demo-data", tmp_path / "classes.txt", "--n", "4"], r"OUT .*classes.txt is a file")
    out = tmp_path / "demo"
    for _ in range(2):  # its own output again
        assert main(["make-demo-data", str(out), "--n", "4", "--val-n", "2", "--shard-size", "2"]) == 0
    assert sorted(os.listdir(mine)) == ["notes.txt", "photo.jpg"] and len(os.listdir(out / "train")) == 2


def test_train_vision_out_rule(refused, run_dir, tmp_path):
    """train-vision's --out: a new or empty folder, or a run directory (it resumes there); never a file, a
    folder of the user's files, a folder inside a run or a cache. Checked before the config or the cache."""
    cmd = ["train-vision", "--images", tmp_path / "x.tar", "--text-cache", tmp_path / "no-cache", "--no-progress"]
    refuses_a_file_and_a_folder_of_others(refused, cmd, tmp_path, "train-vision")
    refused([*cmd, "--out", run_dir / "export"], r"is inside a run directory")
    cache = tmp_path / "a-cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"format": "l2c-text-cache", "shards": {}}) + "\n")
    refused([*cmd, "--out", cache], r"is a text cache \(manifest.json\)")
    before = snapshot(run_dir)
    assert check(run_dir, "train-vision", owns=("config.yaml",), run_ok=True) == run_dir.resolve()  # resumes
    text_run = tmp_path / "text-run"  # a finetune-text run is no train-vision run to resume
    (text_run / "checkpoints" / "contrastive-00000010").mkdir(parents=True)
    (text_run / "config.yaml").write_text("train: {}\n")
    refused([*cmd, "--out", text_run], r"is a run directory \(config.yaml, checkpoints/\): train-vision never writes")
    # past the --out rule, the next check speaks (the config), nothing written into the run
    refused([*cmd, "--out", run_dir], r"model.vision: set `pretrained`")
    assert snapshot(run_dir) == before


def test_eval_suite_out_rule(refused, run_dir, tmp_path):
    cmd = ["eval-suite", "--model", run_dir, "--data", tmp_path]
    refuses_a_file_and_a_folder_of_others(refused, cmd, tmp_path, "eval-suite")
    refused([*cmd, "--out", run_dir], r"is a run directory")


def test_finetune_text_out_rule(refused, run_dir, tmp_path):
    """finetune-text's --out: never a file, a folder of the user's files, or a train-vision run (whose
    checkpoints and metrics its --overwrite would remove); its own run resumes."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"a": "a dog", "b": "a dog runs"}) + "\n")
    cmd = ["finetune-text", "--model", "minilm", "--pairs", pairs]
    refuses_a_file_and_a_folder_of_others(refused, cmd, tmp_path, "finetune-text")
    before = snapshot(run_dir)
    refused([*cmd, "--out", run_dir, "--overwrite"], r"is a run directory \(config.yaml, checkpoints/, metrics.jsonl\)")
    assert snapshot(run_dir) == before
    own = tmp_path / "ft"
    (own / "checkpoints" / "contrastive-00000004").mkdir(parents=True)
    (own / "config.yaml").write_text("train: {}\n")
    assert check(own, "finetune-text", owns=("config.yaml",), run_ok=True) == own.resolve()
