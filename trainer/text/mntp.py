"""Masked next-token prediction (MNTP, LLM2Vec): with bidirectional attention, mask tokens and predict
each masked token from the output at the position before it, through the model's own (frozen) LM head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from l2c.errors import L2CError


def mask_token_id(tokenizer, mask_token: str = "") -> int:
    """The id used for masked positions: the tokenizer's mask token, else `_` (as LLM2Vec does for Llama)."""
    if not mask_token and tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    ids = tokenizer(mask_token or "_", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise L2CError(f"mask token {mask_token or '_'!r} is {len(ids)} tokens for this tokenizer; need one")
    return int(ids[0])


def load_lm_head(model_dir: str | Path, model: torch.nn.Module) -> torch.Tensor:
    """The output projection [vocab, hidden]: `lm_head.weight` from the checkpoint, else the input
    embeddings (tied heads, or base models saved without a head). Returned detached: the head stays frozen."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = [model_dir / "model.safetensors"]
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / weight_map[k] for k in ("lm_head.weight",) if k in weight_map]
    for f in files:
        if f.exists():
            with safe_open(str(f), framework="pt") as sf:
                if "lm_head.weight" in sf.keys():
                    emb = model.get_input_embeddings().weight
                    return sf.get_tensor("lm_head.weight").to(device=emb.device, dtype=emb.dtype)
    return model.get_input_embeddings().weight.detach()


def mask_batch(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    mask_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption of `maskable` positions: (corrupted ids, labels with -100 where not predicted).

    Each chosen token is replaced by the mask id (80%), a random token (10%) or kept (10%); every row with
    a maskable token gets at least one prediction target.
    """
    u = torch.rand(input_ids.shape, generator=generator)
    chosen = (u < mask_prob) & maskable
    # Guarantee one target per row: the maskable position with the smallest draw.
    first = torch.where(maskable, u, 2.0).argmin(1)
    rows = maskable.any(1)
    chosen[rows, first[rows]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    corrupted = input_ids.clone()
    corrupted[chosen & (action < 0.8)] = mask_id
    rand_pos = chosen & (action >= 0.8) & (action < 0.9)
    corrupted[rand_pos] = torch.randint(vocab_size, (int(rand_pos.sum()),), generator=generator)
    return corrupted, labels


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting labels[:, t] from hidden[:, t - 1] (the next-token shift)."""
    h = hidden[:, :-1]
    y = labels[:, 1:]
    sel = y != -100
    logits = h[sel].float() @ head.float().T
    return F.cross_entropy(logits, y[sel])


class MntpBatcher:
    """Token ids of sentences, masked for MNTP; deterministic in (seed, step)."""

    def __init__(self, tokenizer, sentences: list[str], batch_size: int, max_length: int, mask_prob: float,
                 mask_token: str = "", seed: int = 0, vocab_size: int | None = None):  # fmt: skip
        self.tok = tokenizer
        self.sentences = sentences
        self.batch_size = min(batch_size, len(sentences))
        self.max_length = max_length
        self.mask_prob = mask_prob
        self.mask_id = mask_token_id(tokenizer, mask_token)
        self.seed = seed
        self.vocab_size = vocab_size or len(tokenizer)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randperm(len(self.sentences), generator=g)[: self.batch_size].tolist()
        enc = self.tok(
            [self.sentences[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        maskable = (enc["attention_mask"] == 1) & (enc["special_tokens_mask"] == 0)
        maskable[:, 0] = False  # position 0 has no previous output to predict it from
        ids, labels = mask_batch(enc["input_ids"], maskable, self.mask_id, self.vocab_size, self.mask_prob, g)
        return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}
