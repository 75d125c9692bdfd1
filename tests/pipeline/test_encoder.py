import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from l2c.pipeline.encoder import CaptionTokenizer, TextEncoder, load_text_model, pool

TEXTS = ["a dog runs on the beach", "two children play football in a park near a lake at sunset", "cat"]


def reference_mean(path, texts, causal_ok=False):
    """Plain transformers forward + masked mean, one caption at a time (no padding involved)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt")
            h = model(**enc).last_hidden_state[0]
            out.append(F.normalize(h.mean(0), dim=-1).numpy())
    return np.stack(out)


def test_minilm_matches_direct_transformers_forward(minilm_path):
    enc = TextEncoder.load(minilm_path, dtype="float32")
    got = enc.encode(TEXTS)
    ref = reference_mean(minilm_path, TEXTS)
    assert got.shape == (3, 384)
    assert np.all((got * ref).sum(1) >= 0.9999)


def test_decoder_is_bidirectional_and_causal_switch_works(tiny_llama):
    ids = torch.tensor([[101, 2023, 2003, 1037, 3899, 102]])
    changed = ids.clone()
    changed[0, 4] = 4937
    for bidirectional, expect_change in ((True, True), (False, False)):
        model, _, info = load_text_model(tiny_llama, dtype="float32", bidirectional=bidirectional)
        assert info["is_decoder"] and info["bidirectional"] == bidirectional
        with torch.no_grad():
            a = model(input_ids=ids).last_hidden_state[0, 0]
            b = model(input_ids=changed).last_hidden_state[0, 0]
        assert (not torch.allclose(a, b, atol=1e-6)) == expect_change


def test_padding_does_not_change_decoder_vectors(tiny_llama):
    enc = TextEncoder.load(tiny_llama, dtype="float32")
    together = enc.encode(TEXTS)
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    assert np.all((together * alone).sum(1) >= 0.9999)


def test_instruction_is_fed_but_left_out_of_pooling(minilm_path):
    enc = TextEncoder.load(minilm_path, dtype="float32", instruction="Represent this caption:", normalize=False)
    tok = enc.captions(["a red car"])
    n_instr = len(enc.captions.instr_ids)
    assert n_instr > 0 and tok.pool_start[0] == 1 + n_instr
    with torch.no_grad():
        h = enc.model(input_ids=torch.tensor([tok.ids[0]])).last_hidden_state[0]
        want = h[1 + n_instr :].mean(0).numpy()
    np.testing.assert_allclose(enc.encode(["a red car"])[0], want, rtol=1e-5, atol=1e-6)
    plain = TextEncoder.load(minilm_path, dtype="float32").encode(["a red car"])[0]
    assert float(np.dot(plain, want / np.linalg.norm(want))) < 0.999  # the instruction changed the context


def test_truncation_flag_and_lengths(minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    ct = CaptionTokenizer(tok, max_length=8)
    out = ct(["short", "this caption is much longer than eight tokens for sure"])
    assert out.truncated.tolist() == [False, True]
    assert out.n_tokens[1] == 8 and out.ids[1][0] == tok.cls_token_id and out.ids[1][-1] == tok.sep_token_id


def test_pooling_modes():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    assert pool(h, m, "mean").flatten().tolist() == [1.0, 6.0]
    assert pool(h, m, "cls").flatten().tolist() == [0.0, 5.0]
    assert pool(h, m, "last").flatten().tolist() == [2.0, 7.0]
    with pytest.raises(ValueError):
        pool(h, m, "max")


def test_lora_adapter_is_merged_at_load(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModel.from_pretrained(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = TextEncoder.load(tiny_llama, lora=str(tmp_path / "adapter"), dtype="float32").encode(TEXTS)
    plain = TextEncoder.load(tiny_llama, dtype="float32").encode(TEXTS)
    assert np.abs(merged - plain).max() > 1e-3  # the adapter is really applied


def test_unknown_model_name_says_what_to_do():
    from l2c.models import ModelNotFound, resolve_model

    with pytest.raises(ModelNotFound, match="local model directory"):
        resolve_model("no-such-org/no-such-model")


def test_parallel_streams_give_the_single_stream_vectors_and_stats(minilm_path):
    """Several batches at once on threads (one torch thread each): the same vectors, rows and token counts."""
    enc = TextEncoder.load(minilm_path, dtype="float32")
    texts = [f"{t} number {i}" + " with more words" * (i % 7) for i in range(90) for t in TEXTS[:1]]
    tok = enc.captions(texts)
    one, two = {}, {}
    ref = enc.encode_tokenized(tok, batch_tokens=256, max_batch_size=8, stats=one)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = enc.encode_tokenized(tok, batch_tokens=256, max_batch_size=8, stats=two, streams=2)
    finally:
        torch.set_num_threads(threads)
    assert one == two and one["batches"] > 2
    assert np.abs(got - ref).max() < 1e-5
    assert np.all((got[:5] * enc.encode(texts[:5])).sum(1) >= 0.9999)  # rows keep the input order
