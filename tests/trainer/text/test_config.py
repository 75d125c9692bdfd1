"""Every shipped finetune config loads and validates; overrides and bad values are handled."""

from __future__ import annotations

import pytest

from l2c.config import CONFIG_DIR, ConfigError, load_config
from l2c.trainer.text.config import LLAMA_PROJECTIONS, FinetuneTextConfig

SHIPPED = sorted(CONFIG_DIR.glob("finetune_*.yaml"))


def test_the_three_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"finetune_minilm", "finetune_llama3_8b_lora", "finetune_tiny_llama"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(FinetuneTextConfig, path)
    assert cfg.train.batch_size >= 2 and cfg.train.temperature > 0
    if cfg.dist.num_workers > 1:
        assert cfg.train.batch_size % cfg.dist.num_workers == 0


def test_llama3_recipe_is_the_papers():
    cfg = load_config(FinetuneTextConfig, "finetune_llama3_8b_lora")
    assert cfg.lora.enabled and cfg.lora.r == 16 and sorted(cfg.lora.target_modules) == sorted(LLAMA_PROJECTIONS)
    assert cfg.model.dtype == "bfloat16" and cfg.model.pooling == "mean" and cfg.model.bidirectional is True
    assert cfg.mntp.enabled and cfg.model.gradient_checkpointing and cfg.train.temperature == 0.05


def test_minilm_config_is_full_finetuning_on_cpu():
    cfg = load_config(FinetuneTextConfig, "finetune_minilm")
    assert not cfg.lora.enabled and cfg.model.dtype == "float32" and cfg.model.path == "minilm"


def test_overrides_and_errors():
    cfg = load_config(FinetuneTextConfig, "finetune_minilm", ["train.temperature=0.1", "lora.enabled=true"])
    assert cfg.train.temperature == 0.1 and cfg.lora.enabled
    with pytest.raises(ConfigError, match="temperature"):
        load_config(FinetuneTextConfig, None, ["train.temperature=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(FinetuneTextConfig, None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="pooling"):
        load_config(FinetuneTextConfig, None, ["model.pooling=max"])
    with pytest.raises(ConfigError, match="divide"):
        load_config(FinetuneTextConfig, None, ["train.batch_size=9", "dist.num_workers=2"])
    with pytest.raises(ConfigError, match="--model"):
        load_config(FinetuneTextConfig, None, ["data.pairs=[x]"]).check_runnable()
