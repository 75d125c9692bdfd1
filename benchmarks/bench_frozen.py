"""Frozen towers: training steps/s from two caches vs online with the tower frozen vs online with it trained.

Demo scenes (64 px) whose short and dense captions were embedded once with the packaged all-MiniLM-L6-v2, and
two random-weight ViT towers saved as model directories: the configs/demo.yaml tower and a larger one. For each
tower, the same `l2c train-vision` steps (configs/demo.yaml otherwise: adapter, embed dim, batch, CLIP loss):

  (1) caches         --image-cache (features from `l2c embed-images`, made once and timed apart) + text cache:
                     no image is decoded and the tower never runs; only the head and the adapter train
  (2) online frozen  the tars decoded by DataLoader workers, the tower forward without gradients
                     (model.vision.frozen=true), the same head and adapter
  (3) online trained the tower trained too (model.vision.frozen=false), as `train-vision` does by default

Steps/s are measured between the first `--warmup` steps and the last (setup, checkpoint and export left out),
and so is the CPU time of this process per step (`cpu_s_per_step`, all threads): the work a step costs, which
other load on the machine does not change; with `--workers 0` it includes the image decoding.

    nice -n 15 python benchmarks/bench_frozen.py [--steps 30] [--large-steps 8] [--n 1024] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOWERS = {
    "demo": None,  # configs/demo.yaml's model.vision.config
    "large": {
        "model_type": "vit",
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "image_size": 96,
        "patch_size": 16,
    },  # fmt: skip
}


def save_tower(path: Path, config: dict, mean, std) -> Path:
    """A random-weight tower and its image processor, saved as a model directory (made once)."""
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.tower import build_vision_tower

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        tower, _, proc = build_vision_tower(VisionConfig(config=dict(config), image_mean=mean, image_std=std))
        tower.save_pretrained(path)
        proc.save_pretrained(path)
    return path


def embed_images(shards: list[str], tower: Path, out: Path) -> dict:
    from l2c.pipeline.embed_images import ImageEmbedConfig, run_embed_images

    shutil.rmtree(out, ignore_errors=True)
    return run_embed_images(ImageEmbedConfig(sources=shards, out=str(out), model=str(tower), progress=False))


def timed_train(cfg, shards, text_cache, run: Path, warmup: int, image_cache: Path | None = None) -> dict:
    from l2c.trainer.job import TrainJob
    from l2c.trainer.vision.loop import train

    shutil.rmtree(run, ignore_errors=True)
    stamps: list[float] = []
    cpu: list[float] = []  # this process's CPU time, all threads: the work per step, whatever else the machine runs
    t0 = time.perf_counter()
    summary = train(TrainJob(cfg, None if image_cache else shards, text_cache, run, progress=False,
                             image_cache=str(image_cache) if image_cache else None),
                    on_step=lambda step, loss: (stamps.append(time.perf_counter()), cpu.append(time.process_time())))  # fmt: skip
    n = len(stamps) - warmup
    steps_per_s = n / (stamps[-1] - stamps[warmup - 1]) if n > 0 else float("nan")
    return {"steps": len(stamps), "steps_per_s": steps_per_s, "images_per_s": steps_per_s * cfg.batch_size,
            "cpu_s_per_step": (cpu[-1] - cpu[warmup - 1]) / n if n > 0 else float("nan"),
            "final_loss": summary["final_loss"], "wall_s": time.perf_counter() - t0}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps", type=int, default=30, help="steps per run with the demo tower, and from caches"
    )
    ap.add_argument(
        "--large-steps", type=int, default=8, help="steps of the online runs with the larger tower"
    )
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of steps/s")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=1024, help="demo images to generate and embed")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (online runs)")
    ap.add_argument("--towers", default="demo,large")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import prepare

    from l2c.config import load_config, load_yaml
    from l2c.ray_utils import init_ray
    from l2c.trainer.vision.config import TrainConfig

    init_ray()  # one local Ray for every embedding job below (a start per job is slow on a busy machine)
    work = args.out / "frozen"
    shards, text_cache, _ = prepare(args.out / "train", args.n)  # shared with bench_train.py
    demo = load_yaml("demo")["model"]["vision"]
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU, torch {torch.__version__}",
                 "batch_size": args.batch, "images": args.n, "data_workers_online": args.workers, "towers": {}}  # fmt: skip
    out_file = args.out / f"bench_frozen_{args.towers.replace(',', '_')}_b{args.batch}.json"

    def save(res: dict) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(res, indent=2) + "\n")

    for name in args.towers.split(","):
        vcfg = TOWERS[name] or demo["config"]
        tower = save_tower(work / f"tower-{name}", vcfg, demo["image_mean"], demo["image_std"])
        t0 = time.perf_counter()
        emb = embed_images(shards, tower, work / f"images-{name}")
        embed_s = time.perf_counter() - t0
        online_steps = args.steps if name == "demo" else args.large_steps
        base = [f"model.vision.pretrained={tower}", f"batch_size={args.batch}",
                "log_every=1", f"optim.warmup_steps={args.warmup}"]  # fmt: skip

        def cfg(steps: int, *extra: str, base=tuple(base)):
            return load_config(
                TrainConfig, "demo", [*base, f"steps={steps}", f"checkpoint_every={steps}", *extra]
            )

        frozen = ("model.vision.frozen=true", "data.random_crop_scale=[1,1]")
        params = sum(
            p.numel() for p in __import__("transformers").AutoModel.from_pretrained(tower).parameters()
        )
        runs: dict = {}
        res["towers"][name] = {
            "config": vcfg, "params": params, "embed_images_s": embed_s, "embed_images_per_s": emb["rows"] / embed_s,
            "runs": runs,
        }  # fmt: skip
        plan = {
            "caches": (cfg(args.steps, *frozen, "data.workers=0"), work / f"images-{name}"),
            "online_frozen": (cfg(online_steps, *frozen, f"data.workers={args.workers}"), None),
            "online_trained": (cfg(online_steps, f"data.workers={args.workers}"), None),
        }
        for path, (c, image_cache) in plan.items():
            runs[path] = timed_train(
                c, shards, text_cache, work / f"run-{name}-{path}", args.warmup, image_cache
            )
            save(res)  # after every run: a run cut short leaves the figures measured so far
        for other in ("online_frozen", "online_trained"):
            res["towers"][name][f"speedup_caches_over_{other}"] = (
                runs["caches"]["steps_per_s"] / runs[other]["steps_per_s"]
            )

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bench_frozen: batch {args.batch}, {res['machine']}")
    for col in ("tower", "path", "steps/s", "CPU s / step", "× less CPU than online trained"):
        t.add_column(col)
    for name, r in res["towers"].items():
        label = f"{name} ({r['params'] / 1e6:.1f}M, {r['config']['image_size']} px)"
        base = r["runs"]["online_trained"]["cpu_s_per_step"]
        for path, run in r["runs"].items():
            t.add_row(label, path.replace("_", " "), f"{run['steps_per_s']:.2f}", f"{run['cpu_s_per_step']:.3f}",
                      f"{base / run['cpu_s_per_step']:.1f}")  # fmt: skip
            label = ""
        t.add_row("", "embed-images (once)", f"{r['embed_images_per_s']:.0f} img/s", f"{r['embed_images_s']:.0f} s wall", "")
    Console().print(t)
    save(res)
    return res


if __name__ == "__main__":
    main()
