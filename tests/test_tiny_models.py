"""make_tiny_llama: a real Llama-architecture directory with the MiniLM tokenizer's vocabulary."""

from __future__ import annotations

import torch

from tests.tiny_models import make_tiny_llama


def test_tiny_llama_loads_with_matching_vocab(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = make_tiny_llama(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model = AutoModel.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok) == 30522
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    ids = tok(["a dog runs on the beach"], return_tensors="pt")
    hidden = model(**ids).last_hidden_state
    assert hidden.shape == (1, ids["input_ids"].shape[1], 32) and torch.isfinite(hidden).all()
    again = AutoModel.from_pretrained(make_tiny_llama(tmp_path / "again", hidden_size=32, num_layers=1,
                                                      num_heads=2, num_kv_heads=1))  # fmt: skip
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)  # seeded: reproducible
