"""Fixtures for pipeline tests: small webdataset tars with real captions, tiny random models on disk."""

from __future__ import annotations

import io
import json
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
