"""The vLLM engine against the hf engine: same vectors, same cache, same rejects. Runs in .venv-vllm
(`make test-vllm`); skipped where vLLM is not installed."""

import importlib.util
import json

import numpy as np
import pytest

from l2c.cache import CacheError, TextCache, embedding_matrix
from l2c.pipeline.encoder import TextEncoder, Tokenized
from tests.pipeline.conftest import CAPTIONS, caption_shards, write_tar

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed in this environment; `make test-vllm` runs these in .venv-vllm"),
]  # fmt: skip

TEXTS = [*CAPTIONS, "cat", "a very long caption about " + "a crowded market street at dusk " * 120]
INSTRUCTION = "Represent this image caption for retrieval:"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A tiny random bidirectional-capable Llama with head size 32 (vLLM's CPU kernel has no 16)."""
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("llama32"), num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def vllm_encoder():
    """Load a VllmEncoder and stop every engine at module end."""
    from l2c.pipeline.vllm_engine import VllmEncoder

    made = []

    def load(model, **kw):
        made.append(VllmEncoder.load(model, dtype="float32", **kw))
        return made[-1]

    yield load
    for enc in made:
        enc.shutdown()


def test_minilm_vectors_match_hf_including_a_512_token_caption(vllm_encoder, minilm_path):
    hf = TextEncoder.load(minilm_path, dtype="float32", device="cpu")
    tok = hf.captions(TEXTS)
    assert tok.truncated.tolist() == [False] * (len(TEXTS) - 1) + [True] and tok.n_tokens[-1] == 512
    v = vllm_encoder(minilm_path)
    assert v.max_model_len == 512 and v.task == "embed" and v.dim == 384
    stats: dict = {}
    got = v.encode_tokenized(tok, stats=stats)
    ref = hf.encode_tokenized(tok)
    assert got.shape == ref.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, ref).min() >= 0.999
    assert stats == {"real_tokens": int(tok.n_tokens.sum()), "padded_tokens": int(tok.n_tokens.sum()), "batches": 1}


def test_bidirectional_llama_matches_hf_and_is_not_causal(vllm_encoder, llama32):
    v = vllm_encoder(llama32)
    assert v.is_decoder and v.bidirectional and v.attention_types == ["encoder_only"]
    got = v.encode(TEXTS)
    bi = TextEncoder.load(llama32, dtype="float32", device="cpu").encode(TEXTS)
    causal = TextEncoder.load(llama32, dtype="float32", device="cpu", bidirectional=False).encode(TEXTS)
    assert cosines(got, bi).min() >= 0.999
    assert cosines(got, causal).min() < 0.99  # the switch really changed the attention


def test_causal_llama_with_last_token_pooling_matches_hf(vllm_encoder, llama32):
    v = vllm_encoder(llama32, bidirectional=False, pooling="last")
    assert v.attention_types == ["decoder"]
    ref = TextEncoder.load(llama32, dtype="float32", device="cpu", bidirectional=False, pooling="last").encode(TEXTS)
    assert cosines(v.encode(TEXTS), ref).min() >= 0.999


def test_instruction_is_fed_but_left_out_of_pooling(vllm_encoder, llama32):
    v = vllm_encoder(llama32, instruction=INSTRUCTION)
    assert v.task == "token_embed"
    hf = TextEncoder.load(llama32, dtype="float32", device="cpu", instruction=INSTRUCTION)
    tok = hf.captions(CAPTIONS)
    assert tok.pool_start.min() > 1  # [CLS] + instruction tokens are skipped by pooling
    got = v.encode_tokenized(tok)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosines(got, hf.encode_tokenized(tok)).min() >= 0.999
    pooled_with_instruction = hf.encode_tokenized(Tokenized(tok.ids, np.zeros_like(tok.pool_start), tok.n_tokens,
                                                            tok.truncated))  # fmt: skip
    assert cosines(got, pooled_with_instruction).max() < 0.999


def test_clear_errors_for_what_vllm_cannot_run(vllm_encoder, minilm_path, tiny_llama, tmp_path):
    from l2c.errors import L2CError
    from l2c.pipeline.embed_job import EmbedConfig, run_embed
    from l2c.pipeline.vllm_engine import VllmEncoder

    with pytest.raises(ValueError, match="head sizes"):  # the conftest Llama has head size 16
        VllmEncoder.load(tiny_llama, dtype="float32")
    with pytest.raises(ValueError, match="LoRA"):
        VllmEncoder({"model_path": str(minilm_path), "lora": str(tmp_path), "max_length": 64})
    with pytest.raises(L2CError, match="LoRA"):  # the job refuses it in one CLI line
        run_embed(EmbedConfig(sources=[str(tmp_path / "x.tar")], out=str(tmp_path / "c"), engine="vllm",
                              lora=str(tmp_path)))  # fmt: skip
    v = vllm_encoder(minilm_path)
    too_long = Tokenized([[101] * 600], np.zeros(1, np.int32), np.array([600], np.int32), np.zeros(1, bool))
    with pytest.raises(ValueError, match="600 tokens"):
        v.encode_tokenized(too_long)
    assert v.encode_tokenized(Tokenized([], np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool))).shape == (
        0, 384)  # fmt: skip


def _bad_sources(root):
    bad = write_tar(root / "bad.tar", [
        {"__key__": "b0", "txt": "fine caption", "json": {"long_caption": "fine long caption"}},
        {"__key__": "b1", "txt": "", "json": {"long_caption": 7}},
        {"__key__": "b2", "txt": b"\xc3\x28", "json": {"other": "x"}},
        {"__key__": "b0", "txt": "duplicate", "json": {"long_caption": "duplicate"}},
    ])  # fmt: skip
    broken = root / "broken.tar"
    broken.write_bytes(b"\x00not a tar at all" * 100)
    return bad, broken


def test_embed_captions_vllm_writes_the_hf_cache_and_resumes(ray_local, tmp_path, minilm_path):
    """vLLM job in two runs (the second resumes) against one hf run over the same sources."""
    from l2c.cli import main
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    good = caption_shards(tmp_path / "src", n_shards=3, per_shard=4)
    bad, broken = _bad_sources(tmp_path / "src")
    first, every = [good[0], bad, broken], [good[0], good[1], bad, broken, good[2]]
    cfg = dict(model=str(minilm_path), text_fields=["txt", "json:long_caption"], dtype="float32",
               store_dtype="float32", progress=False)  # fmt: skip
    h = run_embed(EmbedConfig(sources=[str(s) for s in every], out=str(tmp_path / "hf"), engine="hf", **cfg))

    out = tmp_path / "vllm"
    assert main(["embed-captions", *map(str, first), "--out", str(out), "--engine", "vllm", "--model", str(minilm_path),
                 "-f", "txt", "-f", "json:long_caption", "--dtype", "float32", "--store-dtype", "float32",
                 "--no-progress"]) == 0  # fmt: skip
    assert TextCache(out).rejected() and len(TextCache(out).shard_names) == 2
    v = run_embed(EmbedConfig(sources=[str(s) for s in every], out=str(out), engine="vllm", runner="local", **cfg))
    # Resume (in this process, the first run was a Ray job): the first run's shards are skipped, the broken one
    # is retried (and fails again).
    assert v["runner"] == "local"
    assert v["shards_skipped"] == 2 and v["shards_written"] == 2 and v["shards_failed"] == ["broken"]
    assert v["rejected_by_reason_this_run"] == {"unreadable_shard": 1}
    assert h["rejected_by_reason_this_run"] == {
        "empty": 1, "not_string": 1, "invalid_utf8": 1, "missing_field": 1, "duplicate_key": 1, "unreadable_shard": 1,
    }  # fmt: skip
    for k in ("shards", "rows", "rejected", "truncated", "dim", "model_fingerprint"):
        assert h[k] == v[k], k
    assert h["rows"] == 4 * 2 * 3 + 2 and h["rejected"] == 6 and v["padding_fraction"] == 0.0

    hc, vc = TextCache(tmp_path / "hf"), TextCache(out)
    assert vc.validate() == [] and hc.shard_names == vc.shard_names == ["bad", "shard-000", "shard-001", "shard-002"]
    assert vc.settings["engine"] == "vllm" and vc.settings["engine_version"].startswith("vllm")
    assert hc.settings["engine"] == "hf" and hc.settings["engine_version"].startswith("transformers")
    assert {k: x for k, x in hc.settings.items() if not k.startswith("engine")} == {
        k: x for k, x in vc.settings.items() if not k.startswith("engine")}  # fmt: skip
    for name in hc.shard_names:
        a, b = hc.read_shard(name), vc.read_shard(name)
        assert a.schema == b.schema and a.num_rows == b.num_rows
        for col in ("key", "field", "n_tokens", "truncated"):
            assert a[col].to_pylist() == b[col].to_pylist(), (name, col)
        assert cosines(embedding_matrix(a), embedding_matrix(b)).min() >= 0.999
        ea, eb = hc.manifest.shards[name], vc.manifest.shards[name]
        assert (ea.rows, ea.n_rejected, ea.n_truncated, ea.n_tokens) == (eb.rows, eb.n_rejected, eb.n_truncated,
                                                                         eb.n_tokens)  # fmt: skip
        assert eb.padded_tokens == eb.n_tokens
    read = lambda c: sorted(json.dumps(r, sort_keys=True) for r in c.rejected())  # noqa: E731
    assert read(hc) == read(vc) and len(read(vc)) == 6

    # A cache holds one engine's vectors: the other engine is refused unless --overwrite.
    with pytest.raises(CacheError, match="engine"):
        run_embed(EmbedConfig(sources=[str(good[0])], out=str(out), engine="hf", **cfg))


def test_gpu_benchmark_vllm_path_at_tiny_shape(tmp_path):
    """The benchmark's vllm path (same saved weights as its hf paths at the tiny shape) agrees with hf."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_embed_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_embed_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--shape", "tiny", "--n", "100", "--paths", "hf_naive,vllm", "--out", str(tmp_path)])
    v = res["paths"]["vllm"]
    assert v["min_cosine_vs_hf_naive"] >= 0.999 and v["padding_fraction"] == 0.0
    assert v["real_tokens"] == res["real_tokens"] and v["tokens_per_s"] > 0
