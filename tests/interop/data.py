"""The captions of the interop tier: real short captions and long dense paragraphs (no pytest here: the
reference venv imports this too)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def _captions(name: str, n_images: int) -> list[str]:
    out = []
    for line in (SHARED / "data" / name).read_text().splitlines()[:n_images]:
        out += json.loads(line)["captions"]
    return out


def dense_captions() -> list[str]:
    """Long, dense paragraphs of real caption text (Flickr8k train), 30 to 900 words: under, around and
    well over the 512-token limit of the official extraction."""
    sentences = _captions("flickr8k_train_captions.jsonl", 400)
    words = " ".join(s.strip().rstrip(".").strip() + "." for s in sentences).split()
    lengths = [30, 60, 100, 160, 220, 280, 330, 360, 380, 395, 396, 398, 400, 402, 405, 415, 425, 435, 445, 455, 470, 490, 520,
               560, 620, 700, 900]  # fmt: skip
    out, at = [], 0
    for n in lengths:
        out.append(" ".join(words[at : at + n]))
        at += n
    return out


def interop_captions() -> list[dict]:
    """Short real captions (Flickr8k dev, COCO val: 5 to 7 per image) and long dense ones, with keys."""
    rows = []
    for i, c in enumerate(_captions("flickr8k_dev_captions.jsonl", 24)):
        rows.append({"key": f"flickr-{i:04d}", "caption": c, "kind": "short"})
    for i, c in enumerate(_captions("coco_val2017_captions.jsonl", 16)):
        rows.append({"key": f"coco-{i:04d}", "caption": c, "kind": "short"})
    for i, c in enumerate(dense_captions()):
        rows.append({"key": f"dense-{i:04d}", "caption": c, "kind": "dense"})
    # Whitespace at the ends: llm2vec keeps the leading and strips the trailing (checked at the encoder level;
    # l2c's sources normalise whitespace before any encoder sees a caption).
    for i, c in enumerate([" A dog runs along the beach .", "Two cats sleep on a sofa   ", "\tA red bus\n"]):
        rows.append({"key": f"edge-{i:04d}", "caption": c, "kind": "edge"})
    return rows


def make_released_teacher(out: Path, seed: int = 0) -> Path:
    """A tiny Llama-3-style teacher in the released layout, built with this venv's transformers (the interop
    tier's own teacher comes from reference.py in .venv-interop): LlamaBiModel + auto_map in config.json, no
    remote-code file, a byte-level BPE tokenizer with the Llama-3 special tokens."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from tests.interop.reference import make_tokenizer, training_text

    texts = training_text(SHARED, 3000)
    header = "<|start_header_id|>user<|end_header_id|>\n\n"
    tok = make_tokenizer(texts + [header + t + "<|eot_id|>" for t in texts[:300]], vocab_size=600)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(seed)
    LlamaModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    c = json.loads((out / "config.json").read_text())
    c.update(architectures=["LlamaBiModel"], auto_map={"AutoModel": "modeling_bidirectional_llama_encoder.LlamaBiModel"})
    (out / "config.json").write_text(json.dumps(c))
    return out
