"""The cluster scaling note: time and cost to embed 15M dense captions and train one epoch at 8, 64 and 512 GPUs.

Reads the measured per-node rates (`bench_node.json` from benchmarks/bench_node.py) and, where one exists, a
GPU run of benchmarks/bench_embed_gpu.py at the 8B shape; the rest comes from configs/scaling.yaml (each
figure's source is printed). Prints a table per stage, writes scaling_note.json and scaling_note.png.

    python benchmarks/bench_node.py && python benchmarks/scaling_note.py
    python benchmarks/scaling_note.py --gpu-json bench-out/bench_embed_gpu_8b.json node.cpu_cores=192
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"gpu": "tab:blue", "cpu": "tab:orange", "object_store": "tab:purple", "storage": "tab:red",
          "network": "tab:green"}  # fmt: skip


def first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def fmt_time(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"node rates measured on {res['measured_node']['machine']}")
    console.print(f"embed GPU rate: {res['embed_tokens_per_gpu_s']:,.0f} tokens/s per GPU ({res['embed_gpu_rate_source']})")
    console.print(f"train GPU rate: {res['train_images_per_gpu_s']:,.0f} images/s per GPU ({res['train_gpu_rate_source']})")
    for stage in ("embed", "train"):
        rows = res[stage]
        limits = list(rows[0]["limits_s"])
        t = Table(title=f"{stage}: time per limit (the slowest sets the pace) + fixed costs")
        for col in ("GPUs", *limits, "fixed", "wall", "bottleneck", "CPU cores/node", "GPU-hours", "cost"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(str(r["gpus"]), *[fmt_time(r["limits_s"][k]) for k in limits], fmt_time(r["fixed_s"]),
                      fmt_time(r["wall_s"]), r["bottleneck"], f"{r['cores_per_node']:.1f}", f"{r['gpu_hours']:.1f}",
                      f"${r['cost_usd']:,.0f}")  # fmt: skip
        console.print(t)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, stage in zip(axes, ("embed", "train"), strict=True):
        rows = res[stage]
        g = [r["gpus"] for r in rows]
        for k in rows[0]["limits_s"]:  # a zero limit (no all-reduce within one node) is not drawn
            y = [r["limits_s"][k] or float("nan") for r in rows]
            ax.plot(g, y, "--o", ms=3, color=COLORS[k], label=f"limit: {k}")
        ax.plot(g, [r["fixed_s"] for r in rows], ":", color="grey", label="fixed: start + model load")
        ax.plot(g, [r["wall_s"] for r in rows], "-o", color="black", lw=2, label="wall (incl. fixed)")
        ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="seconds", title=f"{stage} stage")
        ax.set_xticks(g, [str(x) for x in g])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Where the time goes at 8-512 GPUs (CPU, object store, storage: measured rates; GPU: "
                 + ("measured" if res["embed_gpu_rate_source"].startswith("measured") else "assumed") + ")",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    from l2c.apps.scaling import ScalingConfig, estimate
    from l2c.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="scaling", help="configs/NAME.yaml or a path")
    ap.add_argument("--node-json", type=Path, default=None,
                    help="bench_node.json (default: bench-out/, else docs/bench/)")
    ap.add_argument("--gpu-json", type=Path, default=None,
                    help="bench_embed_gpu JSON of a GPU run (default: bench-out/bench_embed_gpu_8b.json if present)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)
    cfg = load_config(ScalingConfig, args.config, args.overrides)
    node_json = args.node_json or first_existing(ROOT / "bench-out" / "bench_node.json",
                                                 ROOT / "docs" / "bench" / "bench_node.json")  # fmt: skip
    if node_json is None:
        ap.error("no bench_node.json: run benchmarks/bench_node.py first")
    gpu_json = args.gpu_json or first_existing(ROOT / "bench-out" / "bench_embed_gpu_8b.json")
    gpu = json.loads(gpu_json.read_text()) if gpu_json else None
    if gpu and gpu.get("dtype") != "bfloat16":
        ap.error(f"{gpu_json} is a {gpu.get('dtype')} run on {gpu.get('device')}: the note needs a bf16 GPU run")
    res = estimate(cfg, json.loads(node_json.read_text()), gpu)
    res["inputs"] = {"node_json": str(node_json), "gpu_json": str(gpu_json) if gpu_json else None}
    report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling_note.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, args.out / "scaling_note.png")
    return res


if __name__ == "__main__":
    main()
