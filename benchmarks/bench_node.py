"""Per-core rates of the CPU-side work of one node: what a cluster must provision next to its GPUs.

Each figure is measured in one process with one thread, so it is a rate per CPU core:

  read_tokenize   the embed job's read actor: parse a JSONL caption shard, check every caption, tokenize
                  (max 512 tokens) -- with the packaged MiniLM's WordPiece tokenizer and with a byte-level BPE
                  (the kind Llama-3 uses) trained here on the same captions; dense captions of ~150 tokens
                  made by joining the COCO captions of neighbouring images
  parquet_write   one cache shard of 10,000 vectors of 4,096 float16 (an 8B LLM's width): build the Arrow
                  table, write Parquet (zstd) under a temp name, rename; and reading it back
  object_store    a Ray task returns an encoded shard's payload (the pickled bytes the embed job passes from
                  encoder actor to writer), the driver fetches it: bytes/s through one node's object store
  image_decode    the trainer's data path for one image: JPEG decode (reduced-scale draft) and
                  RandomResizedCrop + normalise to 224 and 336 px, on real COCO photos (640 px, ~160 KB)

    python benchmarks/bench_node.py [--out bench-out]      # ~2 minutes on 2 cores

`benchmarks/scaling_note.py` turns this JSON (and bench_embed_gpu's, where there is one) into the cluster
scaling note.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DIM = 4096


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dense_captions(n: int) -> list[str]:
    """~150-token captions: the five COCO captions of an image joined with those of the next two images."""
    from l2c.data.records import read_records

    rows = list(read_records(SHARED / "coco_val2017_captions.jsonl"))
    caps = [" ".join(r["captions"]) for r in rows]
    return [" ".join(caps[(i + j) % len(caps)] for j in range(3)) for i in range(n)]


def best_of(fn, reps: int = 3) -> float:
    """Fastest of `reps` runs, in seconds (the machine is shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bpe_tokenizer(texts: list[str], work: Path):
    """A byte-level BPE (Llama-3's kind of tokenizer) trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=16000, special_tokens=["<s>", "</s>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(work / "bpe")
    return fast


def bench_read_tokenize(work: Path, n: int) -> dict:
    from transformers import AutoTokenizer

    from l2c.models import resolve_model
    from l2c.pipeline.encoder import CaptionTokenizer
    from l2c.pipeline.sources import read_shard

    texts = dense_captions(n)
    src = work / "captions.jsonl"
    src.write_text("".join(json.dumps({"key": f"k{i:07d}", "txt": t}) + "\n" for i, t in enumerate(texts)))
    out = {}
    for name, tok in (("wordpiece_minilm", AutoTokenizer.from_pretrained(resolve_model("minilm"))),
                      ("bytelevel_bpe", bpe_tokenizer(texts, work))):  # fmt: skip
        ct = CaptionTokenizer(tok, 512)
        tokens = int(ct(texts[:2000]).n_tokens.mean() * n)

        def run(ct=ct):
            rows = read_shard(str(src), "captions", ["txt"])
            assert len(rows.texts) == n and not rows.rejects
            ct(rows.texts)

        s = best_of(run)
        out[name] = {"captions_per_s": n / s, "tokens_per_s": tokens / s, "mean_tokens": tokens / n, "seconds": s}
    return out


def bench_parquet(work: Path, rows: int) -> dict:
    import pyarrow.parquet as pq

    from l2c.cache import build_table, write_shard_file

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"{i:012d}" for i in range(rows)]
    nt = rng.integers(100, 300, rows)

    def write():
        table = build_table(keys, ["txt"] * rows, emb, nt, np.zeros(rows, bool), "float16")
        write_shard_file(work, "shard.parquet", table)

    ws = best_of(write)
    size = (work / "shard.parquet").stat().st_size
    rs = best_of(lambda: pq.read_table(work / "shard.parquet"))
    return {"rows": rows, "dim": DIM, "file_bytes": size, "bytes_per_vector": size / rows,
            "write_vectors_per_s": rows / ws, "write_mb_per_s": size / ws / 1e6,
            "read_vectors_per_s": rows / rs, "read_mb_per_s": size / rs / 1e6}  # fmt: skip


def bench_object_store(rows: int) -> dict:
    import ray

    from l2c.ray_utils import init_ray

    started = init_ray(num_cpus=2)

    @ray.remote(num_cpus=1)
    def encoded_payload(rows: int) -> bytes:
        emb = np.random.default_rng(0).standard_normal((rows, DIM)).astype(np.float16)
        return pickle.dumps({"embeddings": emb, "keys": [f"{i:012d}" for i in range(rows)]}, protocol=5)

    try:
        ray.get(encoded_payload.remote(100))  # worker start
        size, times = 0, []
        for _ in range(3):
            ref = encoded_payload.remote(rows)
            ray.wait([ref], fetch_local=False)  # produced and sealed in the store
            t0 = time.perf_counter()
            size = len(ray.get(ref))
            times.append(time.perf_counter() - t0)
            del ref
    finally:
        if started:
            ray.shutdown()
    s = min(times)
    return {"object_bytes": size, "get_seconds": s, "gb_per_s": size / s / 1e9, "rows": rows}


def bench_images(n_reps: int) -> dict:
    import torch

    from l2c.data.images import decode_image
    from l2c.trainer.vision.tower import ImageSpec
    from l2c.trainer.vision.transforms import train_transform

    photos = sorted((SHARED / "coco_mini_val2017").glob("*.jpg"))
    blobs = [p.read_bytes() for p in photos]
    out = {"images": len(blobs), "mean_kb": sum(map(len, blobs)) / len(blobs) / 1e3}
    for size in (224, 336):
        spec = ImageSpec(resize=size, crop=[size, size], image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])
        rng = random.Random(0)

        def run(spec=spec, size=size, rng=rng):
            for b in blobs:
                train_transform(decode_image(b, size), spec, rng, scale=(0.9, 1.0))

        with torch.inference_mode():
            s = best_of(run, n_reps)
        out[f"images_per_s_{size}"] = len(blobs) / s
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=5000)
    ap.add_argument("--shard-rows", type=int, default=10000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="l2c-node-") as w:
        work = Path(w)
        res = {
            "machine": f"{cpu_model()}, {os.cpu_count()} cores",
            "read_tokenize": bench_read_tokenize(work, args.captions),
            "parquet_write": bench_parquet(work, args.shard_rows),
            "object_store": bench_object_store(args.shard_rows),
            "image_decode": bench_images(3),
        }
    report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_node.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_node: per-core rates on {res['machine']}")
    t.add_column("work")
    t.add_column("rate per core", justify="right")
    t.add_column("detail")
    for name, r in res["read_tokenize"].items():
        t.add_row(f"read + tokenize ({name})", f"{r['captions_per_s']:,.0f} captions/s",
                  f"{r['tokens_per_s']:,.0f} tokens/s, {r['mean_tokens']:.0f} tokens per caption")  # fmt: skip
    p = res["parquet_write"]
    t.add_row("Parquet shard write", f"{p['write_vectors_per_s']:,.0f} vectors/s",
              f"{p['write_mb_per_s']:,.0f} MB/s, {p['bytes_per_vector']:,.0f} B per {p['dim']}-d vector")  # fmt: skip
    t.add_row("Parquet shard read", f"{p['read_vectors_per_s']:,.0f} vectors/s", f"{p['read_mb_per_s']:,.0f} MB/s")
    o = res["object_store"]
    t.add_row("object store get (one node)", f"{o['gb_per_s']:.2f} GB/s", f"{o['object_bytes'] / 1e6:,.0f} MB object")
    i = res["image_decode"]
    for size in (224, 336):
        t.add_row(f"JPEG decode + crop {size}px", f"{i[f'images_per_s_{size}']:,.0f} images/s",
                  f"{i['images']} COCO photos, {i['mean_kb']:.0f} KB each")  # fmt: skip
    Console().print(t)


if __name__ == "__main__":
    main()
