"""train-vision start-up at scale: time to the first step and peak RSS of one rank, aligned and join pairing,
on the synthetic data of benchmarks/bench_scale.py at two sizes 10x apart (default 30 and 300 tars of 1,000
keys, 5 captions a key: 150k and 1.5M vectors of 256-d float16).

- **aligned**: the caption tables aligned to the tars by `l2c align-cache` (bench_scale's `aligned()`): each
  data worker reads the shards of its own tars; nothing global is built.
- **join, first start**: the caption tables as they are (no shard of a tar's own): rank 0 builds the join index
  of the whole cache into the run directory.
- **join, later start**: the same run resumed: the index is reused.

Each row is one `train-vision` rank in a fresh process (`data.workers=0`, so the pairing runs in the rank's
process and its memory is counted): start-up = `train()` called to the first optimiser step done; peak RSS =
the process's high-water mark from that call to then (reset after the imports, which come to ~0.4-0.7 GB and are
reported apart as `rss_before_mb`; a 1-block ViT and its optimiser included).

    python benchmarks/bench_train_scale.py [--steps 30,300] [--keys-per-tar 1000] [--dim 256] [--out bench-out]

For bench_scale.py: `SECTIONS.append(train_rows)` adds these rows to its tables (`train_rows(args, data)`
needs `args.work` and `args.partition_mb`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from l2c.memory import peak_rss_mb, rss_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

OVERRIDES = ['model.vision.config={"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, '
             '"num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8}',
             "model.embed_dim=32", "model.adapter.n_blocks=1", "batch_size=8", "steps=2", "optim.warmup_steps=0",
             "precision=fp32", "log_every=1", "checkpoint_every=100", "data.workers=0", "data.shuffle_buffer=64",
             "torch_threads=1"]  # fmt: skip


def reset_peak() -> None:
    """Start VmHWM afresh (Linux: `5` into clear_refs), so a peak measures what came after, not the imports."""
    Path("/proc/self/clear_refs").write_text("5")


def startup(images: list[str], text_cache: str, out: str) -> dict:
    """One rank's start (a fresh run, or the resume of `out`) in this process, after its imports: seconds to the
    first step done, the peak RSS until then and the RSS before, and what the run said of its pairing."""
    from l2c.config import load_config
    from l2c.trainer.job import TrainJob
    from l2c.trainer.vision.config import TrainConfig
    from l2c.trainer.vision.loop import train

    cfg = load_config(TrainConfig, None, OVERRIDES)
    reset_peak()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    first = {}

    def on_step(step: int, loss: float) -> None:
        if not first:
            first.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())

    train(TrainJob(cfg, images, text_cache, out, max_steps=1, progress=False), on_step=on_step)
    skips = json.loads((Path(out) / "data_skips.json").read_text())
    index = skips.get("join_index") or {}
    return {**first, "rss_before_mb": rss0, "pairing": skips["pairing"], "aligned_tars": skips["aligned_tars"],
            "join_tars": skips["join_tars"], "index_built": bool(index.get("built_by_ranks"))}  # fmt: skip


def measure(**kwargs) -> dict:
    """`startup(**kwargs)` in a fresh Python process; its result and the process's own peak RSS (`wait4`)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(kwargs)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"train-vision start-up failed (status {status}): {kwargs}")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "process_peak_rss_mb": usage.ru_maxrss / 1024}


def train_rows(args, data: dict) -> list[dict]:
    """Rows for each step of bench_scale's data: aligned, join (first start), join (later start)."""
    from bench_scale import CAPTIONS, aligned

    rows = []
    for label, ds in data.items():
        runs = args.work / "train-runs" / label.replace(" ", "-").replace(",", "")
        shutil.rmtree(runs, ignore_errors=True)
        cases = [("aligned", aligned(ds, args.partition_mb), runs / "aligned"),
                 ("join, first start", ds.cache, runs / "join"), ("join, later start", ds.cache, runs / "join")]  # fmt: skip
        for how, cache, out in cases:
            m = measure(images=ds.tars, text_cache=str(cache), out=str(out))
            rows.append({"section": "train-vision start-up", "data": label, "pairing": how, "tars": len(ds.tars),
                         "vectors": ds.n_keys * CAPTIONS, "dim": ds.dim, "startup_s": round(m["seconds"], 2),
                         "peak_rss_mb": round(m["peak_rss_mb"]), "rss_before_mb": round(m["rss_before_mb"]),
                         "process_peak_rss_mb": round(m["process_peak_rss_mb"]),
                         "index_built": m["index_built"], "aligned_tars": m["aligned_tars"],
                         "join_tars": m["join_tars"]})  # fmt: skip
    return rows


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Larger step over smaller, per pairing: start-up time and peak RSS (flat: <= 1.5)."""
    out = {}
    for how in dict.fromkeys(r["pairing"] for r in rows):
        part = sorted((r for r in rows if r["pairing"] == how), key=lambda r: r["vectors"])
        if len(part) >= 2:
            a, b = part[0], part[-1]
            out[how] = {k: round(b[k] / a[k], 2) for k in ("startup_s", "peak_rss_mb")}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="30,300", help="tars per step, comma-separated (10x apart)")
    ap.add_argument("--keys-per-tar", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--partition-mb", type=float, default=64, help="align-cache's partitions (aligned rows)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    args.work = args.out / "scale"
    from bench_scale import dataset
    from rich.console import Console
    from rich.table import Table

    from l2c import atomic

    data = {f"{n} tars": dataset(args.work / f"step-{n}", n, args.keys_per_tar, args.dim)
            for n in (int(s) for s in args.steps.split(","))}  # fmt: skip
    rows = train_rows(args, data)
    cols = ["data", "pairing", "vectors", "startup_s", "peak_rss_mb", "rss_before_mb", "index_built"]
    t = Table(title="train-vision start-up, one rank (data.workers=0)")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*(f"{r[c]:,}" if isinstance(r[c], (int, float)) and not isinstance(r[c], bool) else str(r[c])
                    for c in cols))  # fmt: skip
    console = Console()
    console.print(t)
    flat = ratios(rows)
    console.print("10x data, larger over smaller (flat: <= 1.5): "
                  + "; ".join(f"{k}: start-up {v['startup_s']}x, peak RSS {v['peak_rss_mb']}x" for k, v in flat.items()))  # fmt: skip
    result = {"benchmark": "train-vision start-up and peak RSS per rank, aligned and join pairing, 10x apart",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
              "args": {k: str(v) for k, v in vars(args).items()}, "ratios_10x": flat, "rows": rows}  # fmt: skip
    path = args.out / "bench_train_scale.json"
    atomic.write_json(path, result)
    console.print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(startup(**json.loads(sys.argv[2]))))
    else:
        main()
