"""One error model: every command answers bad input with one line and exit 2, a traceback only with --debug."""

import json

import pytest

from l2c.cache import CacheError
from l2c.cli import main


@pytest.fixture
def captions(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"image_id": "a", "caption": "a dog on grass"}) + "\n")
    return p


def test_embed_captions_bad_input_is_one_line(refused, captions, tmp_path):
    embed = ["embed-captions", "--key-field", "image_id", "--text-field", "caption", "--model", "minilm",
             "--no-progress", "--out", tmp_path / "cache"]  # fmt: skip
    refused([*embed[:1], tmp_path / "none-*.jsonl", *embed[1:]], r"none-\*\.jsonl")
    refused([*embed[:1], captions, *embed[1:], "--batch-tokens", "0"], "batch_tokens")
    refused([*embed[:1], captions, *embed[1:-2], "--model", tmp_path / "no-model", "--out", tmp_path / "c2"],
            "no-model")  # fmt: skip


def test_config_errors_name_the_file_and_line(refused, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 10\nmodel:\n  embed_dim: [1\n")
    refused(["train-vision", "--images", tmp_path / "x.tar", "--text-cache", tmp_path, "--out", tmp_path / "r",
             "--config", bad], r"bad.yaml line \d+, column \d+: not valid YAML")  # fmt: skip
    refused(["finetune-text", "--out", tmp_path / "ft", "--config", bad], "bad.yaml line")
    refused(["train-vision", "--images", tmp_path / "x.tar", "--text-cache", tmp_path, "--out", tmp_path / "r",
             "stepz=3"], "stepz: unknown key")  # fmt: skip


def test_cache_info_on_a_folder_without_a_cache(refused, tmp_path):
    refused(["cache-info", tmp_path], "has no manifest.json: not a text cache")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json"):
        main(["--debug", "cache-info", str(tmp_path)])


def test_unwritable_out_fails_before_any_work(refused, captions, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(["eval-cra", "--captions", captions, "--model", "minilm", "--out", blocker / "eval"],
            "cannot create .*a-file/eval")  # fmt: skip
    refused(["embed-captions", captions, "--key-field", "image_id", "--text-field", "caption", "--model", "minilm",
             "--no-progress", "--out", blocker / "cache"], "cannot create .*a-file/cache")  # fmt: skip


def test_missing_captions_file_is_named(refused, tmp_path):
    refused(["eval-cra", "--captions", tmp_path / "nope.jsonl", "--model", "minilm"], "nope.jsonl")


def test_offline_hub_id_is_one_line(refused, captions, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(["embed-captions", captions, "--key-field", "image_id", "--text-field", "caption", "--no-progress",
             "--model", "someorg/some-model", "--out", tmp_path / "c"], "could not fetch 'someorg/some-model'")  # fmt: skip


def test_truncated_tar_in_eval_names_the_file(tmp_path):
    """eval refuses figures on part of a test set: an EvalError (one CLI line) naming the tar."""
    from tests.eval.eval_reference import write_shards

    write_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    (tar,) = sorted((tmp_path / "shards").glob("*.tar"))
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    from l2c.eval.errors import EvalError
    from l2c.eval.features import iter_samples

    with pytest.raises(EvalError, match=f"image shard {tar} could not be read whole"):
        list(iter_samples([str(tar)]))
