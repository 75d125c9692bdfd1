"""Embedding throughput: `l2c embed-captions` end to end against sentence-transformers `encode`, A/B.

The 25,014 COCO val2017 captions (`--set coco`, default; `--set coco+flickr` adds the 30,000 Flickr8k train
captions: 55,014), the packaged all-MiniLM-L6-v2, this machine. Each run is a fresh process, and the two
alternate (ST, l2c, ST, l2c, ...), so load from anything else on the machine falls on both:
  l2c: `run_embed` timed whole: local Ray start, read + tokenize, encode, Parquet written, manifest, Ray stop;
  ST:  model load + `encode(captions)` with its defaults (batch 32, length-sorted).
Reported: every run, the median of the per-round ratios (l2c captions/s over ST's), and the lowest cosine
between l2c's stored vectors (float32) and ST's.

    python benchmarks/bench_embed.py [--set coco|coco+flickr] [--rounds 2] [--limit N] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = {"coco": ["coco_val2017_captions.jsonl"],
        "coco+flickr": ["coco_val2017_captions.jsonl", "flickr8k_train_captions.jsonl"]}  # fmt: skip


def prepare(work: Path, files: list[str], limit: int | None) -> tuple[list[Path], list[str], list[tuple[str, str]]]:
    """Copy (or cut to about `limit` captions) the caption files into `work`; return sources, captions, keys."""
    work.mkdir(parents=True, exist_ok=True)
    srcs, texts, ids = [], [], []
    for name in files:
        lines = (DATA / name).read_text().splitlines()
        if limit:
            lines = lines[: max(1, limit // len(files) // 5)]
        dst = work / name
        dst.write_text("\n".join(lines) + "\n")
        srcs.append(dst)
        for ln in lines:
            rec = json.loads(ln)
            for j, c in enumerate(rec["captions"]):
                texts.append(c)
                ids.append((str(rec["image_id"]), f"captions[{j}]"))
    return srcs, texts, ids


def run_l2c(srcs: list[Path], cache: Path) -> dict:
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    s = run_embed(EmbedConfig(sources=[str(p) for p in srcs], out=str(cache), model="minilm", key_field="image_id",
                              text_fields=["captions[*]"], store_dtype="float32", progress=False))  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "rows": s["rows"], "padding_fraction": s["padding_fraction"],
            "tokens": s["tokens_written"], "rejected": s["rejected"]}  # fmt: skip


def run_st(texts: list[str], save: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    from l2c.models import resolve_model

    t0 = time.perf_counter()
    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu")
    t1 = time.perf_counter()
    emb = model.encode(texts, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True)
    t2 = time.perf_counter()
    np.save(save, emb)
    return {"seconds": t2 - t0, "encode_seconds": t2 - t1, "rows": len(texts)}


def one(kind: str, work: Path, files: list[str], limit: int | None) -> dict:
    """A single timed run, in this process (the parent starts one process per run)."""
    srcs, texts, _ = prepare(work, files, limit)
    res = run_l2c(srcs, work / "cache") if kind == "l2c" else run_st(texts, work / "st.npy")
    res["captions_per_s"] = res["rows"] / res["seconds"]
    return res


def spawn(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", kind, "--set", args.set, "--out", str(args.out)]
    cmd += ["--limit", str(args.limit)] if args.limit else []
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="coco")
    ap.add_argument("--rounds", type=int, default=2, help="ST, l2c pairs, alternating (default 2)")
    ap.add_argument("--limit", type=int, default=None, help="about this many captions (default: the whole set)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--one", choices=["l2c", "st"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = args.out / "embed"
    if args.one:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(one(args.one, work, SETS[args.set], args.limit)))
        return {}

    runs = []
    for r in range(args.rounds):
        for kind in ("st", "l2c"):
            res = {"round": r, "kind": kind, **spawn(kind, args)}
            runs.append(res)
            print(f"round {r} {kind:>3}: {res['seconds']:6.1f} s  {res['captions_per_s']:6.1f} captions/s", flush=True)

    _, texts, ids = prepare(work, SETS[args.set], args.limit)
    from l2c.cache import TextCache

    keys, fields, vecs = TextCache(work / "cache").load()
    index = {kf: i for i, kf in enumerate(zip(keys, fields, strict=True))}
    cos = (vecs[np.array([index[kf] for kf in ids])] * np.load(work / "st.npy")).sum(1)
    ratios = [b["captions_per_s"] / a["captions_per_s"] for a, b in zip(runs[0::2], runs[1::2], strict=True)]
    res = {
        "set": args.set,
        "captions": len(texts),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "runs": runs,
        "ratios_l2c_over_st": ratios,
        "median_ratio_l2c_over_st": statistics.median(ratios),
        "min_cosine_l2c_vs_st": float(cos.min()),
    }

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_embed: {len(texts):,} captions ({args.set}), all-MiniLM-L6-v2, {res['machine']}")
    for col in ("round", "ST s", "ST captions/s", "l2c s", "l2c captions/s", "l2c / ST"):
        t.add_column(col)
    for r, (a, b, q) in enumerate(zip(runs[0::2], runs[1::2], ratios, strict=True)):
        t.add_row(str(r), f"{a['seconds']:.1f}", f"{a['captions_per_s']:,.0f}", f"{b['seconds']:.1f}",
                  f"{b['captions_per_s']:,.0f}", f"{q:.2f}×")  # fmt: skip
    t.add_row("median", "", "", "", "", f"{res['median_ratio_l2c_over_st']:.2f}×")
    Console().print(t)
    print(f"min cosine l2c vs ST: {cos.min():.7f}; l2c padding {runs[-1]['padding_fraction']:.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_embed_{args.set.replace('+', '_')}.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
