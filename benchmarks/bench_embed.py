"""Embedding throughput: `l2c embed-captions` end to end against sentence-transformers `encode`, A/B.

The 25,014 COCO val2017 captions (`--set coco`, default; `--set coco+flickr` adds the 30,000 Flickr8k train
captions: 55,014), the packaged all-MiniLM-L6-v2, this machine. Each run is a fresh process, and the kinds
alternate within every round (ST, l2c, l2c on Ray, ST, ...), so load from anything else falls on all of them:
  st:      import sentence-transformers, model load, `encode(captions)` with its defaults (batch 32,
           length-sorted), vectors saved;
  l2c:     `run_embed` with its default runner (`auto`: on this machine one encoder in the process): read +
           tokenize, encode, Parquet written, manifest;
  l2c-ray: the same with `runner="ray"`: a local Ray started and stopped, the Ray Data job.
Each is timed as a whole process (interpreter start to exit, imports included: what a user waits for); the
seconds inside are shown too (ST: model load + encode, its import left out; l2c: `run_embed`, which imports
torch and transformers itself). Reported: every run, the median of the per-round ratios
(ST's whole-process seconds over each l2c kind's), and the lowest cosine between l2c's stored vectors
(float32) and ST's.

    python benchmarks/bench_embed.py [--set coco|coco+flickr] [--rounds 2] [--limit N] [--skip-ray] [--out bench-out]
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


def run_l2c(srcs: list[Path], cache: Path, runner: str) -> dict:
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    s = run_embed(EmbedConfig(sources=[str(p) for p in srcs], out=str(cache), model="minilm", key_field="image_id",
                              text_fields=["captions[*]"], store_dtype="float32", progress=False, runner=runner))  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "rows": s["rows"], "padding_fraction": s["padding_fraction"],
            "tokens": s["tokens_written"], "rejected": s["rejected"], "runner": s["runner"]}  # fmt: skip


def run_st(texts: list[str], save: Path) -> dict:
    t0 = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    from l2c.models import resolve_model

    t_import = time.perf_counter()
    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu")
    t1 = time.perf_counter()
    emb = model.encode(texts, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True)
    t2 = time.perf_counter()
    np.save(save, emb)
    return {"seconds": t2 - t_import, "import_seconds": t_import - t0, "encode_seconds": t2 - t1, "rows": len(texts)}


def one(kind: str, work: Path, files: list[str], limit: int | None) -> dict:
    """A single timed run, in this process (the parent starts one process per run)."""
    srcs, texts, _ = prepare(work, files, limit)
    if kind == "st":
        return run_st(texts, work / "st.npy")
    return run_l2c(srcs, work / f"cache-{kind}", "ray" if kind == "l2c-ray" else "auto")


KINDS = ("st", "l2c", "l2c-ray")


def spawn(kind: str, args) -> dict:
    """One run in a fresh process, timed whole (start to exit) and inside."""
    cmd = [sys.executable, __file__, "--one", kind, "--set", args.set, "--out", str(args.out)]
    cmd += ["--limit", str(args.limit)] if args.limit else []
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res = {"process_seconds": time.perf_counter() - t0, **json.loads(done.stdout.strip().splitlines()[-1])}
    res["captions_per_s"] = res["rows"] / res["process_seconds"]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="coco")
    ap.add_argument("--rounds", type=int, default=2, help="ST, l2c pairs, alternating (default 2)")
    ap.add_argument("--limit", type=int, default=None, help="about this many captions (default: the whole set)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--skip-ray", action="store_true", help="leave out the l2c-ray runs")
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = args.out / "embed"
    if args.one:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(one(args.one, work, SETS[args.set], args.limit)))
        return {}

    kinds = KINDS if not args.skip_ray else KINDS[:2]
    runs = []
    for r in range(args.rounds):
        for kind in kinds:
            res = {"round": r, "kind": kind, **spawn(kind, args)}
            runs.append(res)
            print(f"round {r} {kind:>7}: {res['process_seconds']:6.1f} s whole process, {res['seconds']:6.1f} s inside",
                  flush=True)  # fmt: skip

    _, texts, ids = prepare(work, SETS[args.set], args.limit)
    from l2c.cache import TextCache

    st = np.load(work / "st.npy")
    cos = {}
    for kind in kinds[1:]:
        keys, fields, vecs = TextCache(work / f"cache-{kind}").load()
        index = {kf: i for i, kf in enumerate(zip(keys, fields, strict=True))}
        cos[kind] = float((vecs[np.array([index[kf] for kf in ids])] * st).sum(1).min())
    by = {(x["round"], x["kind"]): x for x in runs}
    ratios = {k: [by[r, "st"]["process_seconds"] / by[r, k]["process_seconds"] for r in range(args.rounds)]
              for k in kinds[1:]}  # fmt: skip
    res = {
        "set": args.set,
        "captions": len(texts),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "runs": runs,
        "ratios_over_st_whole_process": ratios,
        "median_ratio_over_st_whole_process": {k: statistics.median(v) for k, v in ratios.items()},
        "min_cosine_vs_st": cos,
    }

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_embed: {len(texts):,} captions ({args.set}), all-MiniLM-L6-v2, {res['machine']}")
    for col in ("round", "kind", "whole process s", "captions/s", "inside s", "ST s / this s (whole process)"):
        t.add_column(col)
    for x in runs:
        st_run = by[x["round"], "st"]
        same = x["kind"] == "st"
        t.add_row(str(x["round"]), x["kind"], f"{x['process_seconds']:.1f}", f"{x['captions_per_s']:,.0f}",
                  f"{x['seconds']:.1f}", "" if same else f"{st_run['process_seconds'] / x['process_seconds']:.2f}×")  # fmt: skip
    for k in kinds[1:]:
        t.add_row("median", k, "", "", "", f"{res['median_ratio_over_st_whole_process'][k]:.2f}×")
    Console().print(t)
    print("min cosine vs ST: " + ", ".join(f"{k} {v:.7f}" for k, v in cos.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_embed_{args.set.replace('+', '_')}.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
