"""Caption-encoding throughput of a Llama-architecture LLM2Vec encoder (bidirectional, mean pooling) on a GPU.

Random weights at the Llama-3.2-1B or Llama-3-8B shape (configs below), N captions of random token ids
with a realistic length mix (short 10-20 tokens, dense 100-300), bf16 on CUDA. Four ways to run it:
  hf_naive    transformers + SDPA, fixed-size batches in input order, each padded to its longest caption;
  hf_sorted   l2c's hf engine: `TextEncoder.encode_tokenized` (length-sorted token-budget batches);
  packed      captions packed (first-fit decreasing) into sequences of --batch-tokens with no padding
              between them, attention kept inside each caption by a document mask: FlexAttention (compiled)
              on CUDA, SDPA with a dense mask on CPU; the HF layers' own weights; only a pack's tail is
              padded, to keep one compiled shape;
  vllm        l2c's vllm engine (`VllmEncoder`) where vLLM is importable (random weights: load_format=dummy
              for the 1b/8b shapes, so its vectors are not compared there).
Each path's time is end to end: encoding, then writing the vectors as l2c cache shards (float16 Parquet,
--shard-rows captions each, temp name + rename) on local disk; both parts are reported. Each reports
tokens/s, captions/s and MFU = 2 x non-embedding params x real tokens / time / peak (also for the encoding
alone), with the peak measured first by a large torch.matmul in the same dtype. Vectors of every path are
compared with hf_naive (cosine). `--shape tiny` runs anywhere (CPU, float32) and is what the tests use.
Needs torch, transformers, pyarrow, rich and l2c itself (`pip install --no-deps -e .`): no Ray, no model
package, no hub; `scripts/gpu_bench.sh` is the whole run on a GPU machine.

    python benchmarks/bench_embed_gpu.py --shape 1b --n 20000      # on a GPU
    python benchmarks/bench_embed_gpu.py --shape tiny --n 200      # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
SHAPES = {
    # Head size 32: vLLM's CPU attention kernel has no smaller one.
    "tiny": dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5),
    # meta-llama/Llama-3.2-1B
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=ROPE_LLAMA3, tie_word_embeddings=True),
    # meta-llama/Meta-Llama-3-8B
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
               rope_theta=500000.0, tie_word_embeddings=False),
}  # fmt: skip
ID_RANGE = (1000, 30000)  # inside every tokenizer vocabulary used here (the packaged MiniLM's is 30522)


def caption_lengths(n: int, short_frac: float, seed: int = 0) -> np.ndarray:
    """A length mix: `short_frac` of captions with 10-20 tokens, the rest dense ones with 100-300."""
    rng = np.random.default_rng(seed)
    short = rng.random(n) < short_frac
    return np.where(short, rng.integers(10, 21, n), rng.integers(100, 301, n)).astype(np.int64)


def make_ids(lengths: np.ndarray, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    return [rng.integers(*ID_RANGE, int(n)).tolist() for n in lengths]


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype, size: int | None = None, reps: int = 10) -> float:
    """FLOP/s of a large square matmul: the reference peak for MFU."""
    import torch

    size = size or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def build_model(shape: str, device: str, dtype, seed: int = 0):
    """A random LlamaModel at `shape`, made bidirectional as the hf engine does."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from l2c.pipeline.encoder import make_bidirectional

    config = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=101, eos_token_id=102)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaModel(config)
    finally:
        torch.set_default_dtype(old)
    model.config._attn_implementation = "sdpa"
    return make_bidirectional(model).eval(), config


def bench_tokenizer(work: Path):
    """A WordPiece tokenizer with a generated 30,522-entry vocabulary, saved under `work`.

    The ids are made up (`make_ids`); the tokenizer supplies the pad id and a directory vLLM can load, and
    needs no model package or hub, so the benchmark runs on a bare GPU machine.
    """
    from transformers import BertTokenizerFast

    d = work / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + [f"w{i}" for i in range(SHAPES["tiny"]["vocab_size"] - len(specials))]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    tok.save_pretrained(d)
    return tok


def text_encoder(model, tok, max_length: int):
    """l2c's hf engine around an in-memory model."""
    from l2c.pipeline.encoder import TextEncoder

    dt = next(model.parameters()).dtype
    info = {"pooling": "mean", "instruction": "", "dim": model.config.hidden_size, "bidirectional": True,
            "is_decoder": True, "dtype": str(dt).replace("torch.", "")}  # fmt: skip
    return TextEncoder(model, tok, info, pooling="mean", normalize=True, max_length=max_length)


def run_hf_naive(enc, ids, batch_size: int, stats: dict):
    import torch
    import torch.nn.functional as F

    out = np.zeros((len(ids), enc.dim), np.float32)
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            chunk = ids[s : s + batch_size]
            vec = F.normalize(enc.forward_ids(chunk, np.zeros(len(chunk), np.int64)).float(), dim=-1)
            out[s : s + len(chunk)] = vec.cpu().numpy()
            stats["padded_tokens"] = stats.get("padded_tokens", 0) + max(map(len, chunk)) * len(chunk)
            stats["batches"] = stats.get("batches", 0) + 1
    return out


def run_hf_sorted(enc, ids, batch_tokens: int, max_batch_size: int, stats: dict):
    from l2c.pipeline.encoder import Tokenized

    n = len(ids)
    lengths = np.asarray([len(x) for x in ids], np.int32)
    tok = Tokenized(ids, np.zeros(n, np.int32), lengths, np.zeros(n, bool))
    return enc.encode_tokenized(tok, batch_tokens, max_batch_size, stats)


def packs(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """First-fit decreasing: longest captions first, each into the first pack with room for it."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        j = next((j for j, r in enumerate(room) if r >= n), len(bins))
        if j == len(bins):
            bins.append([])
            room.append(max(budget, n))
        bins[j].append(int(i))
        room[j] -= n
    return [np.asarray(b) for b in bins]


class PackedEncoder:
    """Bidirectional LlamaModel over packed captions: one sequence per pack, a document mask, no padding
    between captions. Uses the model's own modules (norms, projections, rotary, MLP).

    attention="flex": FlexAttention with a document BlockMask (compiled on CUDA; eager elsewhere, where it
    is slow); "sdpa": SDPA with the document mask materialised as a [T, T] bool (exact; for CPU runs).
    """

    def __init__(self, model, budget: int, attention: str | None = None):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.model, self.budget = model, budget
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.attention = attention or ("flex" if on_cuda else "sdpa")
        if self.attention not in ("flex", "sdpa"):
            raise ValueError(f"attention must be flex or sdpa, got {self.attention!r}")
        self.flex = torch.compile(flex_attention, dynamic=False) if on_cuda else flex_attention
        self.create_block_mask = create_block_mask

    def attend(self, q, k, v, scale: float):
        import torch.nn.functional as F

        if self.attention == "flex":
            return self.flex(q, k, v, block_mask=self.mask, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale, enable_gqa=True)

    def forward_pack(self, ids: list[list[int]]):
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        m, dev = self.model, self.device
        lengths = torch.tensor([len(x) for x in ids], device=dev)
        real = int(lengths.sum())
        width = max(self.budget, real)  # one shape for every pack; the tail is its own document
        flat = torch.zeros(width, dtype=torch.long, device=dev)
        flat[:real] = torch.tensor([t for x in ids for t in x], device=dev)
        doc = torch.full((width,), len(ids), device=dev)
        doc[:real] = torch.repeat_interleave(torch.arange(len(ids), device=dev), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(width, device=dev)
        pos[:real] -= torch.repeat_interleave(starts, lengths)
        pos[real:] = 0

        def same_doc(b, h, q, kv):
            return doc[q] == doc[kv]

        if self.attention == "flex":
            self.mask = self.create_block_mask(same_doc, None, None, width, width, device=dev)
        else:
            self.mask = (doc[:, None] == doc[None, :])[None, None]
        x = m.embed_tokens(flat[None])
        cos, sin = m.rotary_emb(x, pos[None])
        for layer in m.layers:
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (p(h).view(1, width, -1, attn.head_dim).transpose(1, 2)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = self.attend(q, k, v, attn.scaling)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, width, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = m.norm(x)[0, :real].float()
        sums = torch.zeros(len(ids), x.shape[-1], device=dev).index_add_(0, doc[:real], x)
        return sums / lengths[:, None].float()

    def encode(self, ids: list[list[int]], stats: dict) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        lengths = np.asarray([len(x) for x in ids], np.int64)
        out = np.zeros((len(ids), self.model.config.hidden_size), np.float32)
        with torch.inference_mode():
            for idx in packs(lengths, self.budget):
                vec = F.normalize(self.forward_pack([ids[i] for i in idx]), dim=-1)
                out[idx] = vec.cpu().numpy()
                stats["padded_tokens"] = stats.get("padded_tokens", 0) + max(self.budget, int(lengths[idx].sum()))
                stats["batches"] = stats.get("batches", 0) + 1
        return out


def vllm_model_dir(model, config, tok, shape: str, work: Path) -> tuple[Path, dict]:
    """A directory vLLM can load: real weights for tiny, config only (load_format=dummy) for 1b/8b."""
    d = work / f"llama-{shape}"
    d.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(d)
    if shape == "tiny":
        model.save_pretrained(d)
        return d, {}
    config.architectures = ["LlamaModel"]
    config.save_pretrained(d)
    return d, {"load_format": "dummy"}


def run_vllm(model_dir: Path, extra: dict, ids, dtype: str, args, stats: dict) -> np.ndarray:
    from l2c.pipeline.encoder import Tokenized
    from l2c.pipeline.vllm_engine import VllmEncoder

    enc = VllmEncoder({"model_path": str(model_dir), "pooling": "mean", "normalize": True, "dtype": dtype,
                       "max_length": args.max_length, "instruction": "", "bidirectional": True, "lora": None,
                       "batch_tokens": args.batch_tokens, "max_batch_size": args.max_batch_size,
                       "vllm_kwargs": extra})  # fmt: skip
    try:
        n = len(ids)
        lengths = np.asarray([len(x) for x in ids], np.int32)
        tok = Tokenized(ids, np.zeros(n, np.int32), lengths, np.zeros(n, bool))
        enc.encode_tokenized(Tokenized(ids[:8], tok.pool_start[:8], lengths[:8], tok.truncated[:8]))  # warm-up
        t0 = time.perf_counter()
        out = enc.encode_tokenized(tok, stats=stats)
        stats["seconds"] = time.perf_counter() - t0
        return out
    finally:
        enc.shutdown()


def write_shards(vectors: np.ndarray, lengths: np.ndarray, out: Path, shard_rows: int) -> float:
    """Write the vectors as l2c cache shards (float16 Parquet, atomic), as the embed job does; returns seconds."""
    from l2c.cache import build_table, write_shard_file

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(vectors), shard_rows):
        rows = range(s, min(s + shard_rows, len(vectors)))
        table = build_table([f"c{i:08d}" for i in rows], ["txt"] * len(rows), vectors[s : rows.stop],
                            lengths[s : rows.stop], np.zeros(len(rows), bool), "float16")  # fmt: skip
        write_shard_file(out, f"shard-{s // shard_rows:06d}.parquet", table)
    return time.perf_counter() - t0


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def main(argv=None) -> dict:
    import importlib.util

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--n", type=int, default=10000, help="captions")
    ap.add_argument("--short-frac", type=float, default=0.7, help="share of 10-20 token captions (rest 100-300)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="token budget per batch/pack (16384; tiny 1024)")
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--naive-batch", type=int, default=64, help="captions per hf_naive batch")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--paths", default="hf_naive,hf_sorted,packed,vllm")
    ap.add_argument("--shard-rows", type=int, default=10000, help="captions per Parquet shard written")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    if args.n < 1 or not 0 <= args.short_frac <= 1:
        ap.error("need --n >= 1 and 0 <= --short-frac <= 1")
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - {"hf_naive", "hf_sorted", "packed", "vllm"}
    if unknown or "hf_naive" not in paths:
        ap.error(f"--paths takes hf_naive (required, the reference), hf_sorted, packed, vllm; got {args.paths}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    args.batch_tokens = args.batch_tokens or (1024 if args.shape == "tiny" else 16384)
    if args.batch_tokens < 302:
        ap.error("--batch-tokens must hold the longest caption (300 tokens)")

    lengths = caption_lengths(args.n, args.short_frac)
    ids = make_ids(lengths)
    real_tokens = int(lengths.sum())
    peak = matmul_peak(device, dtype)
    model, config = build_model(args.shape, device, dtype)
    n_params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    work_dir = tempfile.TemporaryDirectory(prefix="l2c-bench-")
    work = Path(work_dir.name)
    tok = bench_tokenizer(work)
    enc = text_encoder(model, tok, args.max_length)
    write_shards(np.ones((2, config.hidden_size), np.float32), lengths[:2], work / "warm-up", 2)  # imports, codecs

    def timed(name, fn):
        stats: dict = {}
        warm = ids[: min(16, len(ids))]
        fn(warm, {})  # warm-up: kernels, compilation
        sync(device)
        t0 = time.perf_counter()
        vec = fn(ids, stats)
        sync(device)
        stats["encode_s"] = time.perf_counter() - t0
        return vec, stats

    packed = PackedEncoder(model, args.batch_tokens)
    runners = {
        "hf_naive": lambda x, st: run_hf_naive(enc, x, args.naive_batch, st),
        "hf_sorted": lambda x, st: run_hf_sorted(enc, x, args.batch_tokens, args.max_batch_size, st),
        "packed": packed.encode,
    }
    vectors, results = {}, {}
    for name in [p for p in paths if p != "vllm"]:
        vectors[name], results[name] = timed(name, runners[name])
        results[name]["write_s"] = write_shards(vectors[name], lengths, work / name, args.shard_rows)
    if "packed" in results:
        results["packed"]["attention"] = packed.attention
    if "vllm" in paths:
        if importlib.util.find_spec("vllm") is None:
            results["vllm"] = {"skipped": "vllm is not importable in this environment (see `make install-vllm`)"}
        else:
            mdir, extra = vllm_model_dir(model, config, tok, args.shape, work)
            del enc, runners, packed
            model = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()  # vLLM sizes its memory pool from what is free
            stats: dict = {}
            vec = run_vllm(mdir, extra, ids, dtype_name, args, stats)
            stats["encode_s"] = stats.pop("seconds")
            stats["write_s"] = write_shards(vec, lengths, work / "vllm", args.shard_rows)
            results["vllm"] = stats
            if not extra:  # same weights as the hf paths
                vectors["vllm"] = vec
    work_dir.cleanup()

    for name, st in results.items():
        if "encode_s" not in st:
            continue
        s = st["seconds"] = st["encode_s"] + st["write_s"]  # end to end: vectors on the GPU to Parquet on disk
        st["mfu_encode_only"] = 2 * n_params * real_tokens / st["encode_s"] / peak
        st.update(tokens_per_s=real_tokens / s, captions_per_s=args.n / s, mfu=2 * n_params * real_tokens / s / peak,
                  padding_fraction=1 - real_tokens / st["padded_tokens"] if st.get("padded_tokens") else 0.0)  # fmt: skip
        if name in vectors:
            st["min_cosine_vs_hf_naive"] = min_cosine(vectors[name], vectors["hf_naive"])

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    res = {
        "shape": args.shape, "config": SHAPES[args.shape], "params_non_embedding": n_params, "device": gpu,
        "dtype": dtype_name, "torch": torch.__version__, "n_captions": args.n, "real_tokens": real_tokens,
        "length_mix": {"short_frac": args.short_frac, "short": [10, 20], "dense": [100, 300],
                       "mean_tokens": real_tokens / args.n},
        "batch_tokens": args.batch_tokens, "naive_batch": args.naive_batch, "peak_tflops": peak / 1e12,
        "paths": results,
    }  # fmt: skip
    report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_embed_gpu_{args.shape}.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_embed_gpu: {res['shape']} ({res['params_non_embedding'] / 1e9:.3g}B non-embedding params), "
                    f"{res['n_captions']:,} captions, {res['real_tokens']:,} tokens, {res['dtype']} on {res['device']}, "
                    f"matmul peak {res['peak_tflops']:.3g} TFLOP/s")  # fmt: skip
    for col in ("path", "encode s", "Parquet s", "tokens/s", "captions/s", "MFU end to end", "MFU encode",
                "padding", "min cos vs hf_naive"):  # fmt: skip
        t.add_column(col)
    for name, st in res["paths"].items():
        if "skipped" in st:
            t.add_row(name, *["-"] * 7, st["skipped"])
            continue
        cos = st.get("min_cosine_vs_hf_naive")
        t.add_row(name, f"{st['encode_s']:.2f}", f"{st['write_s']:.2f}", f"{st['tokens_per_s']:,.0f}",
                  f"{st['captions_per_s']:,.1f}", f"{st['mfu']:.1%}", f"{st['mfu_encode_only']:.1%}",
                  f"{st['padding_fraction']:.1%}", "-" if cos is None else f"{cos:.6f}")  # fmt: skip
    Console().print(t)


if __name__ == "__main__":
    main()
