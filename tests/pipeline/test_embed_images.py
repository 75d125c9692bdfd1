"""embed-images end to end: a real tiny tower on disk, real tars, real local Ray, real Parquet."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from l2c.cache import CacheError, Manifest, TextCache
from l2c.cli import main
from l2c.data.images import decode_image
from l2c.data.shards import read_tar
from l2c.image_cache import ImageCache
from tests.pipeline.conftest import kill_mid_job, l2c_cli
from tests.trainer.vision.train_helpers import image_tars, save_tower


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    return save_tower(tmp_path_factory.mktemp("tower") / "vit", seed=0)


def embed(tars, out, tower, *flags) -> int:
    return main(
        ["embed-images", *map(str, tars), "--model", str(tower), "--out", str(out), "--no-progress", *flags]
    )


def by_hand(tower_dir: Path, tar: Path):
    """Keys, pooled features and patch-token means of a tar's decodable images, computed here from the parts:
    the model's own processor settings, PIL, the tower's forward (CLS = token 0, patches = tokens 1..)."""
    from transformers import AutoImageProcessor, AutoModel

    proc = AutoImageProcessor.from_pretrained(tower_dir)
    model = AutoModel.from_pretrained(tower_dir).eval()
    size = proc.crop_size["height"]
    keys, pixels = [], []
    for s in read_tar(str(tar)):
        try:
            img = decode_image(s["jpg"], target=size)
        except Exception:
            continue
        img = img.resize((size, size), resample=3) if img.size != (size, size) else img
        arr = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)
        mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
        pixels.append((arr - mean) / std)
        keys.append(s.key)
    with torch.no_grad():
        out = model(pixel_values=torch.stack(pixels))
    return keys, out.pooler_output.numpy(), out.last_hidden_state[:, 1:].mean(1).numpy()


def test_features_equal_the_tower_in_tar_order_and_bad_images_are_counted(ray_local, tower, tmp_path, capsys):
    tars = image_tars(tmp_path / "src")  # 40 px images: the tower's processor resizes them to 32
    out = tmp_path / "cache"
    assert embed(tars, out, tower, "--patch-mean", "--batch-size", "4") == 0
    cache = ImageCache(out)
    assert cache.shard_names == ["img-000", "img-001", "img-002"] and len(cache) == 28 and cache.dim == 32
    for tar in tars:
        keys, pooled, mean = by_hand(tower, tar)
        name = tar.stem
        got_keys, got = cache.features(name, "pooled")
        assert got_keys == keys  # rows in tar key order, the bad samples left out
        np.testing.assert_allclose(got, pooled, atol=1e-5)
        np.testing.assert_allclose(cache.features(name, "patch_mean")[1], mean, atol=1e-5)
        np.testing.assert_allclose(
            cache.features(name, "both")[1], np.concatenate([pooled, mean], 1), atol=1e-5
        )
        # the tar's whole sample sequence comes back, bad samples at their places
        seq, tar_rejects = cache.samples(name)
        assert [s["__key__"] for s in seq] == [s.key for s in read_tar(str(tar))] and tar_rejects == []
    seq, _ = cache.samples("img-001")
    assert seq[3] == {"__key__": "s1_003", "__features__": None, "__reject__": "corrupt_image"}
    assert seq[6] == {"__key__": "s1_006"}
    rejects = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted((r["reason"], r["key"], r["position"]) for r in rejects) == [
        ("corrupt_image", "s1_003", 3), ("missing_image", "s1_006", 6)]  # fmt: skip
    assert (
        cache.manifest.shards["img-001"].n_rejected == 2 and cache.manifest.shards["img-000"].n_rejected == 0
    )
    s = cache.settings
    assert (
        s["model_fingerprint"]
        and s["patch_mean"]
        and s["store_dtype"] == "float32"
        and s["dtype"] == "float32"
    )
    assert s["image_spec"] == {"resize": 32, "crop": [32, 32], "image_mean": s["image_spec"]["image_mean"],
                               "image_std": s["image_spec"]["image_std"]}  # fmt: skip

    capsys.readouterr()
    assert main(["cache-info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image cache" in text and "all shards valid" in text and "3 / 28" in text
    assert main(["cache-info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 28
    with pytest.raises(CacheError, match="is an l2c image cache, not a text cache"):
        TextCache(out)
    f = out / "img-002.parquet"
    pq.write_table(pq.read_table(f).slice(0, 3), f)
    assert main(["cache-info", str(out)]) == 1  # tampering is caught (sha256, rows)


def test_rerun_skips_done_shards_and_refuses_another_tower(ray_local, tower, tmp_path, refused):
    tars = image_tars(tmp_path / "src", n_shards=2, per_shard=4, bad=False)
    out = tmp_path / "cache"
    assert embed(tars[:1], out, tower) == 0
    from l2c.pipeline.embed_images import ImageEmbedConfig, run_embed_images

    s = run_embed_images(
        ImageEmbedConfig(sources=[str(t) for t in tars], out=str(out), model=str(tower), progress=False)
    )
    assert (s["shards_skipped"], s["shards_written"], s["rows"]) == (1, 1, 8)
    other = save_tower(tmp_path / "other", seed=1)
    refused(["embed-images", *tars, "--model", other, "--out", out, "--no-progress"],
            r"already holds a cache made with other settings \(model_fingerprint")  # fmt: skip
    refused(["embed-images", *tars, "--model", tmp_path / "src", "--out", tmp_path / "c2", "--no-progress"],
            "not a transformers model directory")  # fmt: skip
    refused(
        ["embed-images", tmp_path / "none.tar", "--model", tower, "--out", tmp_path / "c3"], "does not exist"
    )
    assert embed(tars, out, other, "--overwrite") == 0
    assert ImageCache(out).fingerprint != s["model_fingerprint"] and len(ImageCache(out)) == 8


def test_local_and_ray_runners_write_the_same_features(ray_local, tower, tmp_path):
    tars = image_tars(tmp_path / "src", n_shards=2, per_shard=8, bad=True)
    assert embed(tars, tmp_path / "local", tower, "--runner", "local") == 0
    assert embed(tars, tmp_path / "ray", tower, "--runner", "ray") == 0
    a, b = ImageCache(tmp_path / "local"), ImageCache(tmp_path / "ray")
    assert a.shard_names == b.shard_names and len(a) == len(b) > 0
    assert a.manifest.to_dict()["shards"] == b.manifest.to_dict()["shards"]  # files, rows, rejects, sha256
    assert a.rejected() == b.rejected()


@pytest.mark.slow
def test_kill_9_mid_job_then_rerun_equals_uninterrupted(ray_local, tower, tmp_path):
    tars = image_tars(tmp_path / "src", n_shards=6, per_shard=40, bad=False)
    ref = tmp_path / "ref"
    assert embed(tars, ref, tower) == 0
    out = tmp_path / "crashed"
    cmd = [*l2c_cli(), "embed-images", *map(str, tars), "--model", str(tower), "--out", str(out), "--no-progress",
           "--batch-size", "8"]  # fmt: skip
    m = out / "manifest.json"
    n_done = kill_mid_job(cmd, {**os.environ, "RAY_ADDRESS": ""},
                          lambda: len(Manifest.load(out).shards) if m.exists() else 0, total=6)  # fmt: skip
    assert 1 <= n_done < 6
    from l2c.pipeline.embed_images import ImageEmbedConfig, run_embed_images

    s = run_embed_images(
        ImageEmbedConfig(sources=[str(t) for t in tars], out=str(out), model=str(tower), progress=False)
    )
    assert s["shards_skipped"] == n_done and s["shards_written"] == 6 - n_done
    a, b = ImageCache(ref), ImageCache(out)
    for name in a.shard_names:
        ka, fa = a.features(name)
        kb, fb = b.features(name)
        assert ka == kb and np.allclose(fa, fb, atol=1e-6)
    assert b.validate() == [] and not list(out.glob(".tmp-*"))


def test_a_bomb_sized_image_is_its_own_reject_and_a_frozen_run_skips_it_as_such(ray_local, tower, tmp_path):
    """embed-images counts an image past PIL's decompression bomb limit as `image_too_large` (not decoded), and
    the image cache hands that reason on, so a frozen-tower run skips it as train-vision does from the tar."""
    import webdataset as wds

    from l2c.data.images import ImageTooLarge
    from l2c.trainer.vision.image_cache import CachedFeatureStream
    from tests.l2c.data.test_images import bomb_png
    from tests.trainer.vision.train_helpers import class_image, jpeg_bytes

    rng = np.random.default_rng(0)
    tar = tmp_path / "src" / "img-000.tar"
    tar.parent.mkdir()
    with wds.TarWriter(str(tar)) as w:
        for i in range(5):
            image = {"png": bomb_png(9500, 9500)} if i == 2 else {"jpg": jpeg_bytes(class_image(i % 4, rng))}
            w.write({"__key__": f"k{i}", **image})
    out = tmp_path / "cache"
    assert embed([tar], out, tower) == 0
    rejects = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["key"], r["position"]) for r in rejects] == [("image_too_large", "k2", 2)]
    seq, _ = ImageCache(out).samples("img-000")
    assert [s["__key__"] for s in seq] == [f"k{i}" for i in range(5)]
    assert seq[2] == {"__key__": "k2", "__features__": None, "__reject__": "image_too_large"}
    with pytest.raises(ImageTooLarge):
        CachedFeatureStream.image_input(None, seq[2], None)
