"""The trainers' one checkpoint format (trainer/checkpoint.py): layout, listing and order, pruning, a write killed
mid-way, refusals, both trainers' states round-tripped, and a run directory in an object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from l2c.errors import L2CError
from l2c.trainer.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[2]


def names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_layout_list_latest_and_prune(tmp_path):
    w = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    for step in range(1, 6):
        c = save_checkpoint(tmp_path, step, {"step": step, "extra": [step]}, keep=3, weights=w, meta={"note": "x"})
    assert c.path == tmp_path / "checkpoints" / "step-00000005" and str(c) == str(c.path)
    assert names(tmp_path) == ["step-00000003", "step-00000004", "step-00000005"]  # nothing else left behind
    assert [(x.name, x.step) for x in list_checkpoints(tmp_path)] == [("step", 3), ("step", 4), ("step", 5)]
    assert latest_checkpoint(tmp_path).step == 5
    assert sorted(p.name for p in c.path.iterdir()) == ["checkpoint.json", "model.safetensors", "state.pt"]
    meta = json.loads((c.path / "checkpoint.json").read_text())
    assert meta == {"format": "l2c-checkpoint", "version": 1, "name": "step", "step": 5,
                    "files": ["model.safetensors", "state.pt"], "note": "x"}  # fmt: skip
    got = load_checkpoint(c)
    assert got["extra"] == [5] and got["meta"]["step"] == 5
    assert set(got["weights"]) == {"a", "b"} and got["weights"]["b"].dtype == torch.bfloat16
    assert torch.equal(got["weights"]["a"], w["a"])
    assert load_checkpoint(tmp_path / "checkpoints" / "step-00000003")["weights"] is not None  # a path works too
    assert latest_checkpoint(tmp_path / "empty") is None and list_checkpoints(tmp_path / "empty") == []


def test_stage_order_not_step_order(tmp_path):
    """finetune-text's stages: every contrastive checkpoint is newer than every MNTP one."""
    order = ("mntp", "contrastive")
    for name, step in (("mntp", 4), ("mntp", 8), ("contrastive", 2)):
        save_checkpoint(tmp_path, step, {}, keep=2, name=name, order=order)
    assert [(c.name, c.step, c.key) for c in list_checkpoints(tmp_path, order)] == [
        ("mntp", 8, (0, 8)), ("contrastive", 2, (1, 2))]  # fmt: skip
    assert names(tmp_path) == ["contrastive-00000002", "mntp-00000008"]
    assert list_checkpoints(tmp_path) == []  # vision's listing ("step") does not take a text run's checkpoints
    with pytest.raises(ValueError, match="lowercase"):
        save_checkpoint(tmp_path, 1, {}, keep=2, name="Bad")


def test_shared_weights_are_saved(tmp_path):
    """Tied weights and views (one storage, several names) are stored, each under its name."""
    base = torch.arange(12.0)
    w = {"emb": base.view(3, 4), "head": base.view(3, 4), "half": base[:6]}
    c = save_checkpoint(tmp_path, 1, {}, keep=1, weights=w)
    got = load_checkpoint(c)["weights"]
    assert all(torch.equal(got[k], w[k]) for k in w)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from l2c.trainer.checkpoint import save_checkpoint

class Stall:  # pickled into state.pt: signals the parent, then waits to be killed mid-write
    def __reduce__(self):
        Path(sys.argv[2]).write_text("writing")
        time.sleep(120)
        return (dict, ())

save_checkpoint(sys.argv[1], 7, {"stall": Stall()}, keep=3)
"""


def test_write_killed_mid_way_leaves_nothing_under_a_final_name(tmp_path):
    """kill -9 while a checkpoint is written: the earlier checkpoints stay latest, the temp directory is
    ignored, and the next save clears it."""
    save_checkpoint(tmp_path, 5, {"ok": 5}, keep=3)
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(flag)], cwd=ROOT)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None and time.time() < deadline, "the writer ended before it was killed"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert names(tmp_path) == [".tmp-step-00000007", "step-00000005"]
    assert [c.step for c in list_checkpoints(tmp_path)] == [5]
    assert load_checkpoint(latest_checkpoint(tmp_path))["ok"] == 5
    save_checkpoint(tmp_path, 6, {"ok": 6}, keep=3)
    assert names(tmp_path) == ["step-00000005", "step-00000006"]


def test_refusals_are_one_line(tmp_path):
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    torch.save({"step": 4}, old / "checkpoints" / "step-00000004.pt")  # the earlier single-file layout
    with pytest.raises(CheckpointError, match="layout of an earlier l2c") as e:
        latest_checkpoint(old)
    assert isinstance(e.value, L2CError) and "\n" not in str(e.value)

    text = tmp_path / "text"
    (text / "checkpoints" / "mntp-0000010").mkdir(parents=True)  # the earlier finetune-text layout
    (text / "checkpoints" / "mntp-0000010" / "state.json").write_text('{"stage": "mntp", "step": 10}')
    with pytest.raises(CheckpointError, match="start a new run directory"):
        list_checkpoints(text, ("mntp", "contrastive"))

    c = save_checkpoint(tmp_path / "new", 1, {}, keep=1)
    meta = json.loads((c.path / "checkpoint.json").read_text())
    (c.path / "checkpoint.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99; this l2c reads 'l2c-checkpoint' version 1"):
        load_checkpoint(c)


def test_vision_state_round_trips_and_continues_exactly(tmp_path):
    """train-vision's checkpoint (whole model in safetensors, optimiser, schedule, RNG in state.pt): a fresh
    model loaded from it equals the saved one and its next steps equal the uninterrupted run's."""
    from l2c.trainer.schedule import make_scheduler
    from l2c.trainer.vision.loop import build_model
    from l2c.trainer.vision.optim import make_optimizer
    from tests.trainer.vision.test_train_vision import tiny_cfg

    cfg = tiny_cfg("steps=10")

    def fresh(seed):
        torch.manual_seed(seed)
        model, _ = build_model(cfg, 16)
        opt = make_optimizer(model, cfg.optim)
        return model, opt, make_scheduler(opt, cfg.steps, cfg.optim.warmup_steps, "cosine", cfg.optim.min_lr_ratio)

    def step(model, opt, sched):
        vec = torch.randn(4, 16)  # drawn from the RNG the checkpoint restores
        loss = model.adapter(vec).pow(2).mean() + sum(p.pow(2).mean() for p in model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    a = fresh(0)
    for _ in range(3):
        step(*a)
    state = {"optimizer": a[1].state_dict(), "scheduler": a[2].state_dict(), "rng": [rng_state()], "step": 3}
    c = save_checkpoint(tmp_path, 3, state, keep=2, weights=a[0].state_dict())
    expected = [step(*a) for _ in range(2)]

    b = fresh(1)
    got = load_checkpoint(c)
    b[0].load_state_dict(got["weights"])
    b[1].load_state_dict(got["optimizer"])
    b[2].load_state_dict(got["scheduler"])
    set_rng_state(got["rng"][0])
    assert set(got["weights"]) == set(a[0].state_dict())
    assert [step(*b) for _ in range(2)] == expected
    for (k, x), y in zip(a[0].state_dict().items(), b[0].state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_text_state_round_trips_and_continues_exactly(tmp_path):
    """finetune-text's checkpoint (trainable LoRA tensors only, optimiser, schedule, RNG) through its own
    save/load: a fresh model resumes the next steps exactly."""
    from transformers import AutoModel

    from l2c.config import load_config
    from l2c.trainer.text import finetune as ft
    from l2c.trainer.text.config import FinetuneTextConfig
    from tests.tiny_models import make_tiny_llama

    path = make_tiny_llama(tmp_path / "llama", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                           intermediate_size=64)  # fmt: skip
    cfg = load_config(FinetuneTextConfig, None, [f"model.path={path}", "lora.enabled=true", "lora.r=4",
                                                 "lora.dropout=0.3"])  # fmt: skip

    def fresh(seed):
        torch.manual_seed(seed)
        model = ft.prepare_trainable(AutoModel.from_pretrained(path), cfg)
        return (model, *ft.make_optimizer(model, 1e-2, 0.01, 1, 10, "cosine"))

    def step(model, opt, sched):
        ids = torch.randint(5, 100, (2, 6))  # and LoRA dropout: both from the restored RNG
        loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    a = fresh(0)
    for _ in range(2):
        step(*a)
    ft.save_checkpoint(tmp_path / "run", "mntp", 2, *a, {"total": 10}, keep=2)
    expected = [step(*a) for _ in range(2)]

    c = list_checkpoints(tmp_path / "run", ft.STAGES)[-1]
    assert (c.name, c.step, c.path.name) == ("mntp", 2, "mntp-00000002")
    meta = json.loads((c.path / "checkpoint.json").read_text())
    assert (meta["stage"], meta["step"], meta["total"]) == ("mntp", 2, 10)
    saved = load_checkpoint(c)["weights"]
    assert set(saved) == set(ft.trainable_state(a[0])) and all("lora_" in k for k in saved)

    b = fresh(1)
    assert ft.load_checkpoint(c, *b)["step"] == 2
    assert [step(*b) for _ in range(2)] == expected


def test_object_store_run_dir_syncs_and_resumes_whole_checkpoints(s3_bucket, tmp_path, monkeypatch):
    """RunDir: checkpoints go up marker last and pruned ones go away; a fresh machine pulls only the newest
    checkpoint that was uploaded whole (one whose upload died before its checkpoint.json is skipped)."""
    from l2c.storage import RunDir, Store

    out = f"{s3_bucket}/runs/r"
    monkeypatch.setenv("L2C_STAGING_DIR", str(tmp_path / "machine-a"))
    run = RunDir(out)
    run.pull()
    (run.local / "metrics.jsonl").write_text("{}\n")
    for step in (1, 2, 3):
        save_checkpoint(run.local, step, {"n": step}, keep=2, weights={"w": torch.full((2,), float(step))})
        run.sync()
    store = Store(out)
    stored = sorted(f.split("/runs/r/")[1] for f in store.fs.find(store.path()))
    assert stored == ["checkpoints/step-00000002/checkpoint.json", "checkpoints/step-00000002/model.safetensors",
                      "checkpoints/step-00000002/state.pt", "checkpoints/step-00000003/checkpoint.json",
                      "checkpoints/step-00000003/model.safetensors", "checkpoints/step-00000003/state.pt",
                      "metrics.jsonl"]  # fmt: skip
    # an upload that died after the data files, before the marker
    store.write_bytes("checkpoints/step-00000004/state.pt", b"partial")

    monkeypatch.setenv("L2C_STAGING_DIR", str(tmp_path / "machine-b"))
    other = RunDir(out)
    assert other.pull() == 4  # metrics.jsonl and step 3's three files
    got = load_checkpoint(latest_checkpoint(other.local))
    assert got["n"] == 3 and torch.equal(got["weights"]["w"], torch.full((2,), 3.0))
    save_checkpoint(other.local, 4, {"n": 4}, keep=2)
    other.sync()
    stored = sorted(f.split("/checkpoints/")[1] for f in store.fs.find(store.path("checkpoints")))
    assert stored == ["step-00000003/checkpoint.json", "step-00000003/model.safetensors",
                      "step-00000003/state.pt", "step-00000004/checkpoint.json", "step-00000004/state.pt"]  # fmt: skip
