"""finetune-text end to end on a tiny random Llama: export, reload, bidirectional attention, CRA, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2c.config import load_config
from l2c.trainer.runlog import read_metrics
from l2c.trainer.text.config import FinetuneTextConfig
from l2c.trainer.text.finetune import finetune_text


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", hidden_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, intermediate_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def small_data(shared_data, tmp_path_factory):
    """200 Flickr8k train images as pairs, 60 COCO val images for CRA (real captions, small for speed)."""
    d = tmp_path_factory.mktemp("data")
    for src, name, n in (("flickr8k_train_captions.jsonl", "pairs.jsonl", 200),
                         ("coco_val2017_captions.jsonl", "coco.jsonl", 60)):  # fmt: skip
        lines = (shared_data / src).read_text().splitlines()[:n]
        (d / name).write_text("\n".join(lines) + "\n")
    return d / "pairs.jsonl", d / "coco.jsonl"


def make_cfg(model, pairs, overrides=(), eval_captions=()):
    cfg = load_config(
        FinetuneTextConfig,
        None,
        ["train.batch_size=8", "model.max_length=32", "train.warmup_steps=1", "train.lr=1e-3", "train.log_every=1",
         *overrides],
    )  # fmt: skip
    cfg.model.path = str(model)
    cfg.data.pairs = [str(pairs)]
    cfg.eval.captions = [str(p) for p in eval_captions]
    return cfg


def train_losses(out, stage="contrastive"):
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train" and r["stage"] == stage]


@pytest.fixture(scope="module")
def lora_run(tiny_llama, small_data, tmp_path_factory):
    pairs, coco = small_data
    out = tmp_path_factory.mktemp("run") / "lora"
    cfg = make_cfg(
        tiny_llama, pairs,
        ["lora.enabled=true", "lora.r=4", "mntp.enabled=true", "mntp.steps=3", "mntp.batch_size=8",
         "train.steps=4", "eval.every=2", "eval.max_images=30", "train.checkpoint_every=2"],
        [coco],
    )  # fmt: skip
    result = finetune_text(cfg, out)
    return out, cfg, result


def test_lora_run_outputs(lora_run):
    out, cfg, result = lora_run
    assert result["finished"] and result["complete"] and result["steps"] == 4 and result["mntp_steps"] == 3
    assert len(train_losses(out, "mntp")) == 3 and len(train_losses(out)) == 4
    assert all(np.isfinite(train_losses(out)))
    settings = json.loads((out / "model" / "l2c_text_encoder.json").read_text())
    assert settings["pooling"] == "mean" and settings["bidirectional"] is True and settings["normalize"] is True
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapters" / "mntp" / "DONE").exists()
    assert (out / "model" / "config.json").exists() and not (out / "model" / "adapter_config.json").exists()
    assert (out / "loss.png").stat().st_size > 1000 and (out / "cra.png").stat().st_size > 1000
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "eval"]
    assert [(r["step"], r["full"], r["n"]) for r in evals] == [
        (0, True, 60), (0, False, 30), (2, False, 30), (4, False, 30), (4, True, 60)
    ]
    assert result["cra"]["coco"]["before"]["step"] == 0 and result["cra"]["coco"]["after"]["step"] == 4
    assert load_config(FinetuneTextConfig, out / "config.yaml") == cfg
    assert len(list((out / "checkpoints").iterdir())) == 2  # keep_checkpoints


def test_reloaded_model_gives_in_memory_vectors(lora_run, small_data):
    """OUT/model through TextEncoder.load (the embed-captions path) equals base + MNTP adapter merged +
    contrastive adapter, held in memory by peft; and it reproduces the CRA recorded at the end of training."""
    from peft import PeftModel

    from l2c.pipeline.encoder import TextEncoder, load_text_model
    from l2c.trainer.text.eval import load_cra_set, measure_cra

    out, cfg, result = lora_run
    texts = ["a dog runs on the beach", "two people ride bikes down a busy city street at night", "a cat"]
    reloaded = TextEncoder.load(out / "model", device="cpu", max_length=32)
    assert reloaded.info["bidirectional"] and reloaded.pooling == "mean"
    base, tok, info = load_text_model(cfg.model.path, device="cpu", lora=out / "adapters" / "mntp")
    in_memory = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    enc = TextEncoder(in_memory, tok, info, pooling="mean", normalize=True, max_length=32)
    np.testing.assert_allclose(reloaded.encode(texts), enc.encode(texts), atol=1e-5)
    cra = measure_cra(reloaded, load_cra_set(small_data[1]))
    assert cra["cra_top1"] == pytest.approx(result["cra"]["coco"]["after"]["cra_top1"])


def make_causal(model):
    """The reverse of make_bidirectional, to compare against the causal attention of the same weights."""
    model.config.is_causal = True
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = True
    return model


def test_trained_model_attention_is_bidirectional(lora_run):
    """In the saved model, changing a later token changes the first token's output (through load_text_model
    and through plain AutoModel: config.json carries is_causal=false); with causal attention it does not."""
    from transformers import AutoModel

    from l2c.pipeline.encoder import load_text_model

    out, _, _ = lora_run
    a = torch.tensor([[101, 1037, 3899, 3216, 102]])
    b = a.clone()
    b[0, 3] = 4937
    loaded, _, info = load_text_model(out / "model", device="cpu")
    assert info["bidirectional"] is True
    plain = AutoModel.from_pretrained(out / "model").eval()
    causal = make_causal(AutoModel.from_pretrained(out / "model").eval())
    for model, changes in ((loaded, True), (plain, True), (causal, False)):
        with torch.no_grad():
            ha, hb = (model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state for x in (a, b))
        assert (not torch.allclose(ha[0, 0], hb[0, 0], atol=1e-6)) is changes
        assert not torch.allclose(ha[0, 4], hb[0, 4], atol=1e-6)  # positions after the change always move


def test_resume_matches_uninterrupted_run(tiny_llama, small_data, tmp_path):
    """Stop after step 3 (checkpoint), rerun: losses of steps 4-6 equal those of a run never stopped.
    LoRA dropout makes the losses depend on the restored RNG, the cosine schedule on the restored scheduler."""
    pairs, _ = small_data
    common = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.3", "train.steps=6", "train.checkpoint_every=2"]
    straight = finetune_text(make_cfg(tiny_llama, pairs, common), tmp_path / "straight")
    stopped = finetune_text(make_cfg(tiny_llama, pairs, [*common, "train.max_steps=3"]), tmp_path / "cut")
    assert not stopped["finished"] and stopped["steps"] == 3 and stopped["stopped_by"] == "max_steps"
    assert not (tmp_path / "cut" / "model").exists()
    resumed = finetune_text(make_cfg(tiny_llama, pairs, common), tmp_path / "cut")
    assert straight["complete"] and resumed["complete"]
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "cut")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert len(set(a)) == 6  # the steps really differ


def test_cli_rerun_and_refusals(refused, tiny_llama, small_data, tmp_path):
    from l2c.cli import main

    pairs, _ = small_data
    out = tmp_path / "cli"
    args = ["finetune-text", "--model", str(tiny_llama), "--pairs", str(pairs), "--out", str(out), "--steps", "2",
            "train.batch_size=4", "model.max_length=16"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 2
    assert main(args) == 0  # a finished run is not redone
    assert len(train_losses(out)) == 2
    # checkpoints of another setting: refused naming the key, the run's value and this one's
    refused([*args[:-2], "train.batch_size=6", "--steps", "3"], "train.batch_size: run 4, now 6")
    refused([*args, "--no-resume"], "leave out --no-resume .* --overwrite")
    assert main([*args[:7], "--steps", "3", *args[9:]]) == 0  # extending resumes from step 2
    assert len(train_losses(out)) == 3
    assert main([*args, "--overwrite"]) == 0
    assert len(train_losses(out)) == 2
    refused([*args[:6], "s3://bucket/run", *args[7:]], "every node mounts")  # object-store run dirs: train-vision only


@pytest.mark.slow
def test_ray_two_workers_match_one_process(tiny_llama, small_data, tmp_path, ray_local):
    """2 Ray Train workers split each global batch and gather embeddings (with gradients) for the in-batch
    negatives: the losses equal a one-process run's (no dropout in a full fine-tune of the tiny Llama)."""
    pairs, _ = small_data
    common = ["train.steps=3", "train.checkpoint_every=10"]
    one = finetune_text(make_cfg(tiny_llama, pairs, common), tmp_path / "one")
    two = finetune_text(make_cfg(tiny_llama, pairs, [*common, "dist.num_workers=2"]), tmp_path / "two")
    assert one["complete"] and two["complete"]
    np.testing.assert_allclose(train_losses(tmp_path / "two"), train_losses(tmp_path / "one"), rtol=1e-4)
    assert (tmp_path / "two" / "model" / "config.json").exists()
