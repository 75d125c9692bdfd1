"""Every shipped train-vision config loads and validates; the official recipe is the paper's."""

from __future__ import annotations

import pytest

from l2c.config import CONFIG_DIR, ConfigError, load_config
from l2c.trainer.vision.config import TrainConfig

SHIPPED = [CONFIG_DIR / f"{n}.yaml" for n in ("demo", "flickr8k_cpu", "llm2clip_eva02_l14_336", "llm2clip_openai_l14_336")]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.optim.warmup_steps < cfg.steps and cfg.batch_size >= 1


def test_official_recipe():
    cfg = load_config(TrainConfig, "llm2clip_eva02_l14_336")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.batch_size, cfg.optim.grad_clip) == (1e-5, 0.05, 512, 5.0)
    assert cfg.model.adapter.n_blocks == 4 and cfg.model.adapter.expansion == 2 and cfg.model.embed_dim == 1280
    assert cfg.precision == "bf16" and cfg.loss.kind == "clip" and cfg.loss.gather_with_grad


@pytest.mark.parametrize("name", ["llm2clip_eva02_l14_336", "llm2clip_openai_l14_336"])
def test_official_recipes_draw_one_caption_per_step(name):
    """The official trainer's choice: one cached caption per image and step, no mined negatives, one dim."""
    cfg = load_config(TrainConfig, name)
    assert (cfg.loss.positives, cfg.loss.hard_negatives, cfg.model.nested_dims) == ("one", 0, [])


def test_demo_builds_a_vit_from_config():
    cfg = load_config(TrainConfig, "demo", ["steps=5", "optim.warmup_steps=1"])
    assert cfg.model.vision.config["model_type"] == "vit" and not cfg.model.vision.pretrained
    assert cfg.steps == 5 and set(cfg.data.caption_weights) == {"txt", "json:long_caption"}


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_steps=500", "warmup_steps"), ("data.random_crop_scale=[0.5, 2]", "random_crop_scale"),
    ("loss.kind=triplet", "should be .clip. or .siglip."), ("model.adapter.n_blocks=-1", "n_blocks"), ("batchsize=3", "unknown"),
    ("loss.positives=some", "should be .one. or .all."), ("loss.hard_negatives=-1", "hard_negatives"),
    ("model.nested_dims=[64,32]", "nested_dims"), ("model.nested_dims=[64,4096]", "nested_dims"),
])  # fmt: skip
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, "demo", [override])
