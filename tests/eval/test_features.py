"""Image shards eval cannot read are one line naming the shard; images it cannot decode are counted skips
with their reason (a decompression-bomb-sized one as `image_too_large`), never a crash or a warning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_reference import export_tiny_model, write_shards

from l2c.cli import main
from tests.l2c.data.test_images import bomb_png

TEXT_DIM = 16
SETTINGS = {"model": "test-encoder", "dim": TEXT_DIM, "fields": ["txt"], "model_fingerprint": "f00d",
            "store_dtype": "float32"}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    samples = write_shards(root / "shards", n_shards=1, per_shard=6, extra={"s0-0002": {"jpg": bomb_png(9500, 9500)}})
    export_tiny_model(root / "run", TEXT_DIM, SETTINGS)
    return root, samples


def retrieval(root, cache, images, out=None):
    return ["eval-retrieval", "--model", root / "run", "--images", images, "--text-cache", cache, "--allow-missing",
            *(["--out", out] if out else [])]  # fmt: skip


def test_unreadable_tars_are_one_line(refused, setup, make_cache, tmp_path):
    root, samples = setup
    keys = [s["key"] for s in samples]
    cache = make_cache(keys, ["txt"] * len(keys), np.eye(len(keys), TEXT_DIM, dtype=np.float32), fingerprint="f00d")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shard-00000.tar").write_bytes((root / "shards" / "shard-00000.tar").read_bytes())
    (bad / "shard-00001.tar").write_bytes(b"")
    refused(retrieval(root, cache, bad), rf"image shard {bad}/shard-00001.tar could not be read: an empty file")
    (bad / "shard-00001.tar").write_bytes(b"not a tar at all")
    refused(retrieval(root, cache, bad), r"shard-00001.tar could not be read: not a readable tar")


def test_a_bomb_sized_image_is_a_counted_skip(setup, make_cache, tmp_path):
    root, samples = setup
    keys = [s["key"] for s in samples]
    cache = make_cache(keys, ["txt"] * len(keys), np.eye(len(keys), TEXT_DIM, dtype=np.float32), fingerprint="f00d")
    out = tmp_path / "eval"
    assert main([str(a) for a in retrieval(root, cache, root / "shards", out)]) == 0
    got = json.loads((out / "eval.json").read_text())
    assert got["skipped_images"]["count"] == 1 and got["n_images"] == 5
    (key, reason), = got["skipped_images"]["samples"]
    assert key == "s0-0002" and reason.startswith("image_too_large: 90,250,000 pixels")
