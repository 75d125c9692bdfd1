"""train-vision's image stream: an image past PIL's decompression bomb limit is a counted skip with its own
reason (`image_too_large`, in the summary and data_skips.json), never decoded and never a warning."""

from __future__ import annotations

import json
import warnings

import numpy as np
import webdataset as wds
from PIL import Image

from l2c.trainer.job import TrainJob
from l2c.trainer.vision.loop import train
from tests.l2c.data.test_images import bomb_png
from tests.trainer.vision.test_train_vision import DIM, tiny_cfg
from tests.trainer.vision.train_helpers import class_image, class_vectors, jpeg_bytes, write_cache


def test_a_bomb_sized_image_is_a_counted_skip(tmp_path):
    rng = np.random.default_rng(0)
    vec = class_vectors(1, DIM)[0]
    tar = tmp_path / "tars" / "shard-000000.tar"
    tar.parent.mkdir()
    rows = []
    with wds.TarWriter(str(tar)) as w:
        for i in range(10):
            key = f"k{i:02d}"
            image = {"png": bomb_png(9500, 9500)} if i == 4 else {"jpg": jpeg_bytes(class_image(i % 4, rng))}
            w.write({"__key__": key, "txt": f"caption {key}", **image})
            rows.append((key, "txt", vec + 0.1 * rng.standard_normal(DIM).astype(np.float32)))
    cache = write_cache(tmp_path / "cache", {tar.stem: (str(tar.resolve()), rows)}, DIM, ["txt"])
    cfg = tiny_cfg("batch_size=9", "steps=1", "optim.warmup_steps=0", "data.shuffle_buffer=0")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary = train(TrainJob(cfg, [str(tar)], cache, tmp_path / "run", progress=False))
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert summary["samples_seen"] == 9 and summary["skips"]["image_too_large"] == 1
    assert summary["skips"]["corrupt_image"] == 0
    skips = json.loads((tmp_path / "run" / "data_skips.json").read_text())
    assert skips["examples"] == {"image_too_large": ["k04"]}
