"""Embedding throughput: `l2c embed-captions` end to end against sentence-transformers `encode`.

The same 55,014 captions (every caption of COCO val2017 and Flickr8k train, from ../shared/data), the
packaged all-MiniLM-L6-v2, one machine, one run:
  (1) l2c: local Ray start, read + tokenize, encoder actor, Parquet written, manifest — all timed;
  (2) sentence-transformers: model load + `encode(captions)` with its default batching (batch 32).

    python benchmarks/bench_embed.py [--limit N] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = ["coco_val2017_captions.jsonl", "flickr8k_train_captions.jsonl"]


def prepare(out: Path, limit: int | None) -> tuple[list[Path], list[str], list[tuple[str, str]]]:
    """Copy (or cut) the caption files into the bench dir; return sources, captions and their (key, field)."""
    out.mkdir(parents=True, exist_ok=True)
    srcs, texts, ids = [], [], []
    per_file = None if limit is None else max(1, limit // len(SOURCES))
    for name in SOURCES:
        lines = (DATA / name).read_text().splitlines()
        if per_file:
            lines = lines[: max(1, per_file // 5)]
        dst = out / name
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
                              text_fields=["captions[*]"], store_dtype="float32", progress=True))  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "rows": s["rows"], "padding_fraction": s["padding_fraction"],
            "tokens": s["tokens_written"], "rejected": s["rejected"]}  # fmt: skip


def run_st(texts: list[str]) -> tuple[dict, np.ndarray]:
    from sentence_transformers import SentenceTransformer

    from l2c.models import resolve_model

    t0 = time.perf_counter()
    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu")
    t1 = time.perf_counter()
    emb = model.encode(texts, show_progress_bar=True, convert_to_numpy=True, normalize_embeddings=True)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "encode_seconds": t2 - t1, "rows": len(texts)}, emb


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="about this many captions (default: all 55,014)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.out / "embed"
    srcs, texts, ids = prepare(work, args.limit)

    l2c = run_l2c(srcs, work / "cache")
    st, st_emb = run_st(texts)

    from l2c.cache import TextCache

    keys, fields, vecs = TextCache(work / "cache").load()
    index = {kf: i for i, kf in enumerate(zip(keys, fields, strict=True))}
    order = np.array([index[kf] for kf in ids])
    cos = (vecs[order] * st_emb).sum(1)

    res = {
        "captions": len(texts),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "l2c": {**l2c, "captions_per_s": l2c["rows"] / l2c["seconds"]},
        "sentence_transformers": {**st, "captions_per_s": st["rows"] / st["seconds"],
                                  "encode_only_captions_per_s": st["rows"] / st["encode_seconds"]},  # fmt: skip
        "min_cosine_l2c_vs_st": float(cos.min()),
    }
    res["ratio_l2c_over_st"] = res["l2c"]["captions_per_s"] / res["sentence_transformers"]["captions_per_s"]

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_embed: {len(texts):,} captions, all-MiniLM-L6-v2, {res['machine']}")
    for col in ("path", "seconds", "captions/s", "notes"):
        t.add_column(col)
    t.add_row("l2c embed-captions (end to end)", f"{l2c['seconds']:.1f}", f"{res['l2c']['captions_per_s']:,.0f}",
              f"Ray start + Parquet; padding {l2c['padding_fraction']:.1%}")
    t.add_row("sentence-transformers encode", f"{st['seconds']:.1f}",
              f"{res['sentence_transformers']['captions_per_s']:,.0f}",
              f"load + encode; encode alone {res['sentence_transformers']['encode_only_captions_per_s']:,.0f}/s")
    t.add_row("ratio l2c / ST", f"{res['ratio_l2c_over_st']:.2f}×", "", f"min cosine l2c vs ST {cos.min():.6f}")
    Console().print(t)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_embed.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
