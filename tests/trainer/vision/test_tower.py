"""Vision towers from a config: transformer and convolutional, block depths, freezing, flips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from l2c.trainer.vision.config import OptimConfig, VisionConfig
from l2c.trainer.vision.model import L2CModel
from l2c.trainer.vision.optim import param_groups
from l2c.trainer.vision.tower import (
    block_index_of,
    build_vision_tower,
    freeze_first_blocks,
    pooled_output,
    transformer_blocks,
)
from l2c.trainer.vision.transforms import train_transform

VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
       "intermediate_size": 64, "image_size": 32, "patch_size": 8}
RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 2, 1],
          "image_size": 32}


@pytest.mark.parametrize("config,n_blocks,width", [(VIT, 3, 32), (RESNET, 4, 32)])
def test_blocks_depths_and_freezing(config, n_blocks, width):
    tower, spec, _ = build_vision_tower(VisionConfig(config=dict(config)))
    assert len(transformer_blocks(tower)) == n_blocks and spec.image_size == 32
    assert pooled_output(tower, torch.randn(2, 3, 32, 32)).shape == (2, width)
    depth = block_index_of(tower)
    assert set(depth.values()) <= set(range(n_blocks + 2)) and min(depth.values()) == 0
    frozen = freeze_first_blocks(tower, 2)
    for name, p in tower.named_parameters():
        assert p.requires_grad == (depth[name] > 2), name
    assert frozen == sum(p.numel() for p in tower.parameters() if not p.requires_grad) > 0
    # layer decay: deeper blocks get larger lr scales, the head the full lr; frozen blocks get none
    model = L2CModel(tower, spec, text_dim=16, embed_dim=8, n_blocks=1)
    scales = sorted({g["lr_scale"] for g in param_groups(model, OptimConfig(layer_decay=0.5))})
    assert scales[-1] == 1.0 and scales[0] == 0.5 ** (n_blocks + 1 - 3)  # the first trainable block is 3


def test_hflip_mirrors_the_image_half_the_time():
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :8] = 255  # a white band on the left
    img = Image.fromarray(arr)
    spec = build_vision_tower(VisionConfig(config=dict(VIT)))[1]
    left = []
    for seed in range(40):
        x = train_transform(img, spec, random.Random(seed), scale=(1.0, 1.0), hflip=True)
        left.append(bool(x[0, :, :8].mean() > x[0, :, -8:].mean()))
    assert 10 <= sum(left) <= 30  # about half flipped
    same = [train_transform(img, spec, random.Random(s), scale=(1.0, 1.0)) for s in range(3)]
    assert all(bool(x[0, :, :8].mean() > x[0, :, -8:].mean()) for x in same)  # off: never flipped


def test_eval_transform_equals_the_clip_image_processor(shared_data):
    """Resize (long side truncated), center crop and normalise exactly as transformers' CLIP processor."""
    import json

    import transformers

    from l2c.trainer.vision.tower import image_spec_from_processor
    from l2c.trainer.vision.transforms import eval_transform

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    d = shared_data / "coco_mini_val2017"
    recs = [json.loads(x) for x in (d / "captions.jsonl").read_text().splitlines()[:12]]
    for size in (32, 224):
        proc = cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        spec = image_spec_from_processor(proc)
        for r in recs:
            img = Image.open(d / r["file"]).convert("RGB")
            want = torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0]))
            assert torch.allclose(eval_transform(img, spec), want, atol=1e-6), (size, r["file"])
