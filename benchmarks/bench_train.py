"""Training throughput: what the text cache saves, and whether the data path keeps up with the model.

One small model (configs/demo.yaml: a 4-block ViT at 64 px, adapter, CLIP loss) on demo scenes whose short
and dense captions were embedded once with the packaged all-MiniLM-L6-v2. Three ways to run the same steps:

  (1) cached    `l2c train-vision` itself: tars streamed and decoded by DataLoader workers, vectors from the
                Parquet cache (the real path, checkpoint and export included)
  (2) in-loop   the same stream, but every step also runs MiniLM on the batch's captions (training without a cache)
  (3) compute   the model on in-memory tensors: no data path at all

Targets: (1)/(3) >= 0.9 (the data path never starves the model); (1)/(2) is reported with the FLOP counts
that explain it.

    python benchmarks/bench_train.py [--steps 40] [--batch 128] [--out bench-out]
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
import torch

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["txt", "json:long_caption"]


def prepare(work: Path, n: int) -> tuple[list[str], Path, dict]:
    """Demo shards and their MiniLM cache (made once, reused by later runs)."""
    from l2c.cli import main

    data, cache = work / "data", work / "cache"
    if not (data / "info.json").exists():
        main(["make-demo-data", str(data), "--n", str(n), "--val-n", "8", "--image-size", "64", "--overwrite"])
    info = json.loads((data / "info.json").read_text())
    shards = [str(data / p) for p in info["splits"]["train"]["shards"]]
    if not (cache / "manifest.json").exists():
        main(["embed-captions", *shards, "--out", str(cache), "--model", "minilm", "--no-progress",
              *[a for f in FIELDS for a in ("--text-field", f)]])
    return shards, cache, captions_of(shards)


def captions_of(shards: list[str]) -> dict:
    """(key, field) -> caption text, read from the tars (what the in-loop encoder needs)."""
    from l2c.data.shards import read_tar

    out = {}
    for s in (s for url in shards for s in read_tar(url)):
        out[(s["__key__"], "txt")] = s["txt"].decode()
        out[(s["__key__"], "json:long_caption")] = json.loads(s["json"])["long_caption"]
    return out


def step_fn(model, opt, loss_fn):
    def step(pixels, vectors):
        img, txt, scale, bias = model(pixels, vectors)
        loss = loss_fn(img, txt, scale, bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        return float(loss.detach())

    return step


def run_cached(cfg, shards, cache, work: Path, steps: int) -> dict:
    from l2c.trainer.job import TrainJob
    from l2c.trainer.vision.loop import train

    run = work / "run-cached"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(TrainJob(cfg, shards, cache, run, progress=False))
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 4 :]  # the first quarter warms up the workers
    ips = float(np.mean([r["images_per_s"] for r in steady]))
    return {"images_per_s": ips, "data_wait": float(np.mean([r["data_wait"] for r in steady])),
            "wall_s_with_setup_and_export": total, "steps": summary["step"]}  # fmt: skip


def run_in_loop(cfg, shards, cache, captions: dict, steps: int) -> dict:
    """The same stream; the text vectors come from MiniLM run on the batch's captions at every step."""
    from l2c.cache import TextCache
    from l2c.teacher import build_text_encoder
    from l2c.trainer.vision.data import StreamSpec
    from l2c.trainer.vision.loader import make_loader
    from l2c.trainer.vision.loop import build_model
    from l2c.trainer.vision.loss import make_loss
    from l2c.trainer.vision.optim import make_optimizer
    from l2c.trainer.vision.pairing import plan_pairing

    tc = TextCache(cache)
    model, _ = build_model(cfg, tc.dim)
    step = step_fn(model, make_optimizer(model, cfg.optim), make_loss("clip", False))
    encoder = build_text_encoder(tc.teacher)  # the teacher that made the cache, run as it ran
    pairing = plan_pairing(tc, shards, "auto", FIELDS, cache.parent / "index")
    spec = StreamSpec(shards=shards, pairing=pairing, image_spec=model.image_spec, batch_size=cfg.batch_size,
                      seed=0, rank=0, world_size=1, num_workers=cfg.data.workers,
                      field_weights=dict(cfg.data.caption_weights), shuffle_buffer=cfg.data.shuffle_buffer)
    it = iter(make_loader(spec))
    times, text_s, tokens = [], 0.0, 0
    for i in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        texts = [captions[(k, f)] for k, f in zip(batch["keys"], batch["fields"], strict=True)]
        t1 = time.perf_counter()
        with torch.no_grad():
            vectors = torch.from_numpy(encoder.encode(texts))
        t2 = time.perf_counter()
        step(batch["pixel_values"], vectors)
        if i >= steps // 4:
            times.append(time.perf_counter() - t0)
            text_s += t2 - t1
            tokens += sum(len(x) for x in encoder.captions(texts).ids)
    n = len(times) * cfg.batch_size
    return {"images_per_s": n / sum(times), "text_encoder_fraction": text_s / sum(times),
            "caption_tokens_per_image": tokens / n,
            "text_params": sum(p.numel() for k, p in encoder.model.named_parameters() if "embeddings" not in k)}


def run_compute(cfg, dim: int, steps: int) -> dict:
    from l2c.trainer.vision.loop import build_model
    from l2c.trainer.vision.loss import make_loss
    from l2c.trainer.vision.optim import make_optimizer

    model, _ = build_model(cfg, dim)
    step = step_fn(model, make_optimizer(model, cfg.optim), make_loss("clip", False))
    size = model.image_spec.image_size
    g = torch.Generator().manual_seed(0)
    pixels = [torch.randn(cfg.batch_size, 3, size, size, generator=g) for _ in range(4)]
    vectors = [torch.randn(cfg.batch_size, dim, generator=g) for _ in range(4)]
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(pixels[i % 4], vectors[i % 4])
        if i >= steps // 4:
            times.append(time.perf_counter() - t0)
    vit = model.tower
    return {"images_per_s": len(times) * cfg.batch_size / sum(times),
            "vision_params": sum(p.numel() for p in vit.parameters()),
            "image_tokens": (size // vit.config.patch_size) ** 2 + 1}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=2000, help="demo images to generate and embed")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (data.workers)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from l2c.cache import TextCache
    from l2c.config import load_config
    from l2c.trainer.vision.config import TrainConfig

    work = args.out / "train"
    shards, cache, captions = prepare(work, args.n)
    cfg = load_config(TrainConfig, "demo", [f"steps={args.steps}", f"batch_size={args.batch}", "log_every=2",
                                            "optim.warmup_steps=2", f"checkpoint_every={args.steps}",
                                            f"data.workers={args.workers}"])
    compute = run_compute(cfg, TextCache(cache).dim, args.steps)
    cached = run_cached(cfg, shards, cache, work, args.steps)
    in_loop = run_in_loop(cfg, shards, cache, captions, args.steps)

    # forward+backward of the vision side ~ 6 x params x tokens; a frozen text encoder forward ~ 2 x params x tokens
    # (non-embedding parameters: an embedding lookup costs no multiply-adds)
    vision_flop = 6 * compute["vision_params"] * compute["image_tokens"]
    text_flop = 2 * in_loop["text_params"] * in_loop["caption_tokens_per_image"]
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, torch {torch.__version__}",
        "config": "demo", "batch_size": args.batch, "steps": args.steps, "data_workers": args.workers,
        "cached": cached, "in_loop": in_loop, "compute_only": compute,
        "ratio_cached_over_compute": cached["images_per_s"] / compute["images_per_s"],
        "ratio_cached_over_in_loop": cached["images_per_s"] / in_loop["images_per_s"],
        "flop_per_image": {"vision_fwd_bwd": vision_flop, "text_encoder_fwd": text_flop,
                           "text_over_vision": text_flop / vision_flop},
    }  # fmt: skip

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_train: configs/demo.yaml, batch {args.batch}, {res['machine']}")
    for col in ("path", "images/s", "notes"):
        t.add_column(col)
    t.add_row("(1) cached vectors (train-vision)", f"{cached['images_per_s']:.1f}",
              f"data wait {cached['data_wait']:.1%} of step time")
    t.add_row("(2) text encoder in the loop", f"{in_loop['images_per_s']:.1f}",
              f"MiniLM takes {in_loop['text_encoder_fraction']:.0%} of each step")
    t.add_row("(3) compute only (in-memory)", f"{compute['images_per_s']:.1f}", "")
    t.add_row("(1)/(3)", f"{res['ratio_cached_over_compute']:.2f}", "target >= 0.9")
    t.add_row("(1)/(2)", f"{res['ratio_cached_over_in_loop']:.2f}×",
              f"text {text_flop / 1e9:.2f} vs vision {vision_flop / 1e9:.2f} GFLOP per image")
    Console().print(t)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_train_w{args.workers}.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
