"""Fixtures for pipeline tests: small webdataset tars with real captions, tiny random models on disk."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CAPTIONS = [
    "a dog runs on the beach", "two children play football in a park", "a red car parked near a tree",
    "a woman rides a bicycle down the street", "a plate of pasta with tomato sauce", "a cat sleeps on a sofa",
    "a man surfing a large wave", "people waiting at a train station", "a bowl of fruit on a wooden table",
    "a bird perched on a branch", "a group of friends at a picnic", "an airplane flying over mountains",
]  # fmt: skip


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Samples as {"__key__": str, "txt": str|bytes, "json": dict|bytes, ...} → a real webdataset tar."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            s = dict(s)
            if isinstance(s.get("json"), dict):
                s["json"] = json.dumps(s["json"]).encode()
            if isinstance(s.get("txt"), str):
                s["txt"] = s["txt"].encode()
            w.write(s)
    return path


def kill_mid_job(cmd: list[str], env: dict, manifest_shards, total: int, timeout: float = 240) -> int:
    """Start `cmd` in its own session, SIGKILL the whole group (driver and its local Ray, as a machine crash
    would) once `manifest_shards()` counts between 1 and total - 1 finished shards; returns that count."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if 1 <= manifest_shards() < total:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return manifest_shards()


def l2c_cli() -> list[str]:
    return [sys.executable, "-m", "l2c.cli"]


def caption_shards(root: Path, n_shards: int = 3, per_shard: int = 8) -> list[Path]:
    out = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            j = s * per_shard + i
            short = CAPTIONS[j % len(CAPTIONS)]
            samples.append({
                "__key__": f"s{s:02d}-{i:04d}", "txt": short,
                "json": {"long_caption": f"{short}, seen in photo number {j}, with much detail about the scene."},
            })  # fmt: skip
        out.append(write_tar(root / f"shard-{s:03d}.tar", samples))
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, minilm_path) -> Path:
    """A tiny random Llama (tokenizer from the packaged MiniLM), saved with save_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()
