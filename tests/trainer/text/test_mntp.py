"""MNTP: masking statistics, the next-token shift of the loss, and the LM head source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2c.trainer.text.mntp import MntpBatcher, load_lm_head, mask_batch, mask_token_id, mntp_loss


def test_mask_batch_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 50), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :3] = False
    maskable[5] = False  # a row with nothing to mask
    corrupted, labels = mask_batch(ids, maskable, mask_id=7, vocab_size=30522, mask_prob=0.2, generator=g)
    chosen = labels != -100
    assert not chosen[~maskable].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])  # untouched outside the targets
    assert (chosen[maskable.any(1)].sum(1) >= 1).all()  # every row with maskable tokens has a target
    rate = chosen.sum().item() / maskable.sum().item()
    assert 0.17 < rate < 0.23
    masked = (corrupted[chosen] == 7).float().mean().item()
    kept = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert 0.74 < masked < 0.86 and 0.05 < kept < 0.16


def test_loss_predicts_from_previous_position():
    """Reference: for every target (row, t), cross-entropy of softmax(hidden[row, t-1] @ head.T) at label."""
    rng = np.random.default_rng(0)
    hidden = torch.tensor(rng.normal(size=(2, 5, 4)))
    head = torch.tensor(rng.normal(size=(10, 4)))
    labels = torch.full((2, 5), -100)
    labels[0, 2], labels[1, 4], labels[1, 1] = 3, 9, 0
    ref = []
    for r, t in [(0, 2), (1, 1), (1, 4)]:
        logits = hidden[r, t - 1].numpy() @ head.numpy().T
        ref.append(np.log(np.exp(logits).sum()) - logits[labels[r, t].item()])
    assert mntp_loss(hidden, labels, head).item() == pytest.approx(float(np.mean(ref)), rel=1e-5)


def test_batcher_and_head_on_tiny_llama(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from tests.tiny_models import make_tiny_llama

    path = make_tiny_llama(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    assert mask_token_id(tok) == tok.mask_token_id
    head = load_lm_head(path, model)  # saved without a head: the input embeddings serve
    assert torch.equal(head, model.embed_tokens.weight)
    b = MntpBatcher(tok, ["a dog runs", "two cats sleep on a sofa", "a red bus"], 3, 32, 0.3, seed=1).batch(0)
    special = torch.isin(b["input_ids"], torch.tensor(tok.all_special_ids)) & (b["input_ids"] != tok.mask_token_id)
    assert not (b["labels"] != -100)[special].any() and not (b["labels"][:, 0] != -100).any()
    assert ((b["labels"] != -100).sum(1) >= 1).all()
    assert torch.equal(b["input_ids"], MntpBatcher(tok, ["a dog runs", "two cats sleep on a sofa", "a red bus"],
                                                   3, 32, 0.3, seed=1).batch(0)["input_ids"])  # fmt: skip
