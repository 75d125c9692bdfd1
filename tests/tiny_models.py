"""Tiny random models saved as real transformers directories, for demos and tests (no hub access needed)."""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(
    out_dir: str | Path,
    tokenizer_from: str | Path = "minilm",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama-architecture decoder (`LlamaModel`, no LM head) with a borrowed tokenizer.

    The vocabulary is the tokenizer's, so any tokenizer works; `minilm` takes the packaged MiniLM's
    WordPiece tokenizer. Returns `out_dir`, loadable with `AutoModel.from_pretrained`.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from l2c.models import resolve_model

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer_from))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.cls_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
