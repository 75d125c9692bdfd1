"""l2c's teacher vectors against the official extraction: llm2vec 0.2.3 itself (in .venv-interop) encodes real
captions with a tiny random Llama-3-style teacher in the released LLM2CLIP layout, l2c's cache must equal it.

`make test-interop` runs these in .venv; the vLLM case runs in .venv-vllm (`make test-vllm`)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from l2c.cache import TextCache
from l2c.cli import main
from tests.interop.conftest import cosines, requires_interop

pytestmark = [pytest.mark.interop, requires_interop]
MAX_LENGTH = 512  # the official extraction's max_length and doc_max_length


def by_key(ref: dict, keys: list[str]) -> np.ndarray:
    index = {k: i for i, k in enumerate(ref["keys"])}
    return np.asarray([index[k] for k in keys])


def report(what: str, cos: np.ndarray, keys: list[str]) -> None:
    below = [k for k, c in zip(keys, cos, strict=True) if c < 0.9999]
    print(f"{what} vs llm2vec: min cosine {cos.min():.8f} (1 - min = {1 - cos.min():.1e}) over {len(cos)} captions, "
          f"{len(below)} below 0.9999 {below}")  # fmt: skip


def assert_same_tokens(got, ref: dict) -> None:
    """Token ids and pooled span (the last n tokens) of every caption equal llm2vec's."""
    assert [list(x) for x in got.ids] == ref["ids"]
    np.testing.assert_array_equal(got.n_tokens - got.pool_start, ref["n_pooled"])


def embed(teacher, captions_file, out, *extra, status: int = 0) -> TextCache | None:
    argv = ["embed-captions", str(captions_file), "--out", str(out), "--model", str(teacher), "--key-field", "key",
            "--text-field", "caption", "--store-dtype", "float32", "--no-normalize", "--no-progress", *extra]  # fmt: skip
    assert main(argv) == status
    return TextCache(out) if status == 0 else None


def test_released_layout_loads_without_its_remote_code(teacher):
    from l2c.pipeline.encoder import load_text_model

    cfg = json.loads((teacher / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaBiModel"] and "modeling_bidirectional_llama_encoder" in cfg["auto_map"]["AutoModel"]
    assert not list(teacher.glob("*.py"))  # the remote-code file is absent: l2c must not need it
    net, tok, info = load_text_model(teacher, dtype="float32", device="cpu")
    assert type(net).__name__ == "LlamaModel" and not net.config.is_causal
    assert info["released_class"] == "LlamaBiModel" and info["bidirectional"] and info["is_decoder"]
    assert info["prompt_format"] == "llm2vec-llama3" and "released LLM2CLIP teacher" in info["prompt_format_source"]
    assert tok.padding_side == "left" and tok("a dog")["input_ids"][0] == tok.bos_token_id


def test_token_ids_and_pooled_span_equal_llm2vec(teacher, llm2vec_ref):
    from transformers import AutoTokenizer

    from l2c.pipeline.encoder import CaptionTokenizer

    ct = CaptionTokenizer(AutoTokenizer.from_pretrained(teacher), MAX_LENGTH, "", "llm2vec-llama3")
    got = ct([r["caption"] for r in llm2vec_ref["rows"]])
    assert_same_tokens(got, llm2vec_ref)
    # The long captions cover every case of llm2vec's cut: whole, sequence cut (eot lost, header pooled),
    # and caption + eot alone over max_length (BOS pooled too).
    pooled = got.n_tokens - got.pool_start
    assert got.truncated.sum() >= 10 and (got.n_tokens <= MAX_LENGTH).all()
    assert ((pooled == MAX_LENGTH) & got.truncated).any()
    assert ((pooled < MAX_LENGTH) & (pooled > MAX_LENGTH - 5) & got.truncated).any()
    texts = [r["caption"] for r in llm2vec_ref["rows"]]
    plain = np.asarray([not t[:1].isspace() and "!@#$%^&*()" not in t for t in texts])
    # BOS + <|start_header_id|> user <|end_header_id|> \n\n
    assert (got.pool_start[~got.truncated & plain] == 5).all()


def test_paragraph_captions_cover_the_whitespace_cases(teacher, llm2vec_ref):
    """The paragraph set holds what dense caption sets are made of, and llm2vec reads it as written: each
    caption with its whitespace collapsed has other token ids."""
    from transformers import AutoTokenizer

    from l2c.pipeline.encoder import CaptionTokenizer

    rows = [i for i, r in enumerate(llm2vec_ref["rows"]) if r["kind"] == "paragraph"]
    texts = [llm2vec_ref["rows"][i]["caption"] for i in rows]
    for mark in ("\n\n", "\n", "  ", "\t", "\r\n", "\u00a0", "é", "京", "🐱", "!@#$%^&*()"):
        assert any(mark in t for t in texts), mark
    assert any(t[0].isspace() for t in texts) and any(t[-1].isspace() for t in texts)
    words = np.asarray([len(t.split()) for t in texts])
    lengths = np.asarray([len(llm2vec_ref["ids"][i]) for i in rows])
    pooled = llm2vec_ref["n_pooled"][rows]
    assert ((words < MAX_LENGTH) & (pooled == MAX_LENGTH)).any()  # past 512 tokens, under 512 words
    assert (words > MAX_LENGTH).sum() >= 2 and (lengths[words > MAX_LENGTH] == MAX_LENGTH).all()  # cut by tokens
    assert ((words > MAX_LENGTH) & (pooled == MAX_LENGTH)).any()
    assert ((lengths == MAX_LENGTH) & (pooled < MAX_LENGTH) & (pooled > MAX_LENGTH - 5)).any()  # eot cut off
    ct = CaptionTokenizer(AutoTokenizer.from_pretrained(teacher), MAX_LENGTH, "", "llm2vec-llama3")
    collapsed = ct([" ".join(t.split()) for t in texts])
    inner = [j for j, t in enumerate(texts) if lengths[j] < MAX_LENGTH and t.strip() != " ".join(t.split())]
    assert len(inner) >= 8 and all(list(collapsed.ids[j]) != llm2vec_ref["ids"][rows[j]] for j in inner)


def test_encoder_equals_llm2vec_in_float32(teacher, llm2vec_ref):
    from l2c.pipeline.encoder import TextEncoder

    texts = [r["caption"] for r in llm2vec_ref["rows"]]
    enc = TextEncoder.load(teacher, dtype="float32", device="cpu", normalize=False)
    got = enc.encode(texts, batch_tokens=8192, max_batch_size=16)
    ref = llm2vec_ref["emb_float32"]
    cos = cosines(got, ref)
    report("float32 encoder", cos, llm2vec_ref["keys"])
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-3)
    # The check can fail: without the Llama-3 turn, or with causal attention, the vectors are others.
    plain = TextEncoder.load(teacher, dtype="float32", device="cpu", prompt_format="none").encode(texts[:40])
    causal = TextEncoder.load(teacher, dtype="float32", device="cpu", bidirectional=False).encode(texts[:40])
    assert cosines(plain, ref[:40]).min() < 0.99 and cosines(causal, ref[:40]).min() < 0.99


@pytest.mark.parametrize("dtype,ref_key,floor", [("float32", "emb_float32", 0.9999), ("bfloat16", "emb_bfloat16", 0.999)])
def test_cache_equals_llm2vec(teacher, captions_file, llm2vec_ref, tmp_path, capsys, dtype, ref_key, floor):
    cache = embed(teacher, captions_file, tmp_path / "cache", "--dtype", dtype)
    s = cache.settings
    assert s["prompt_format"] == "llm2vec-llama3" and s["released_class"] == "LlamaBiModel"
    assert "released LLM2CLIP teacher" in s["prompt_format_source"] and s["dtype"] == dtype
    keys, _, vecs = cache.load()
    assert sorted(keys) == sorted(llm2vec_ref["keys"])  # every caption, its whitespace as written
    ref = llm2vec_ref[ref_key][by_key(llm2vec_ref, keys)]
    cos = cosines(vecs, ref)
    kinds = np.asarray([llm2vec_ref["rows"][i]["kind"] for i in by_key(llm2vec_ref, keys)])
    with capsys.disabled():  # the figures reach the terminal with -s
        report(f"{dtype} cache", cos, keys)
        print("  min by kind: " + ", ".join(f"{k} {cos[kinds == k].min():.8f}" for k in sorted(set(kinds))))
    assert cos.min() >= floor
    table = cache.read_shard(cache.shard_names[0], ["key", "n_tokens", "truncated"])
    idx = by_key(llm2vec_ref, table.column("key").to_pylist())
    assert table.column("n_tokens").to_pylist() == [len(llm2vec_ref["ids"][i]) for i in idx]
    assert sum(table.column("truncated").to_pylist()) >= 10

    # Another format into the same cache is refused like another model (exit 2); cache-info shows the format.
    capsys.readouterr()
    embed(teacher, captions_file, tmp_path / "cache", "--dtype", dtype, "--prompt-format", "none", status=2)
    assert "prompt_format: cache has 'llm2vec-llama3', this run 'none'" in capsys.readouterr().err
    assert main(["cache-info", str(tmp_path / "cache"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["prompt_format"] == "llm2vec-llama3"


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (make test-vllm)")
def test_vllm_engine_equals_llm2vec(teacher, llm2vec_ref):
    """vLLM is fed llm2vec's token ids and pools llm2vec's span: whitespace, paragraphs and long captions too."""
    from l2c.pipeline.vllm_engine import VllmEncoder

    texts = [r["caption"] for r in llm2vec_ref["rows"]]
    enc = VllmEncoder.load(teacher, dtype="float32", normalize=False)
    try:
        assert enc.prompt_format == "llm2vec-llama3" and enc.task == "token_embed"
        assert enc.bidirectional and enc.attention_types in ([], ["encoder_only"])
        got = enc.encode(texts)  # refuses a caption whose token states are not one per id
        assert_same_tokens(enc.captions(texts), llm2vec_ref)
    finally:
        enc.shutdown()
    cos = cosines(got, llm2vec_ref["emb_float32"])
    report("vllm float32 engine", cos, llm2vec_ref["keys"])
    assert cos.min() >= 0.9999


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (make test-vllm)")
def test_vllm_cache_equals_llm2vec(teacher, captions_file, llm2vec_ref, tmp_path):
    cache = embed(teacher, captions_file, tmp_path / "cache", "--dtype", "float32", "--engine", "vllm")
    assert cache.settings["engine"] == "vllm" and cache.settings["prompt_format"] == "llm2vec-llama3"
    keys, _, vecs = cache.load()
    assert sorted(keys) == sorted(llm2vec_ref["keys"])
    cos = cosines(vecs, llm2vec_ref["emb_float32"][by_key(llm2vec_ref, keys)])
    report("vllm float32 cache", cos, keys)
    assert cos.min() >= 0.9999
    table = cache.read_shard(cache.shard_names[0], ["key", "n_tokens"])
    idx = by_key(llm2vec_ref, table.column("key").to_pylist())
    assert table.column("n_tokens").to_pylist() == [len(llm2vec_ref["ids"][i]) for i in idx]
