"""Every cached caption in the step: the photo demo (Flickr8k) trained with each option against today, 3 seeds each.

Options (train-vision overrides on `configs/flickr8k_cpu.yaml`; `one` is today's draw of one caption per image):

  one      loss.positives=one (the official recipe: one of the five captions drawn per image and step)
  all      loss.positives=all (all five captions of each image in the step, multi-positive loss)
  neg      loss.hard_negatives=4 (4 captions of each image's mined neighbours as extra gallery texts;
           `l2c mine-negatives` runs once on the train cache first)
  nested   model.nested_dims=[64,128] (the loss summed at 64, 128 and 256 dims)
  all+neg  both

Each run is `l2c train-vision` in a subprocess (its CPU time, data workers included, taken from the OS) and
`l2c eval-retrieval` on the 1,000 held-out dev photos against all 5,000 of their captions; nested runs also get
recall at each nested dim. The photos are made into shards and their captions embedded once (OUT/demo, as
`make demo-photos` does); every run reuses them. A rerun skips what is done, so the grid may be stopped and
continued; `--options one,all --steps 1800` runs an adopted option and today at the full schedule.

Equal CPU time: an option whose CPU time per run differs from today's by more than `--cpu-tolerance` also
trains for the steps today's CPU time buys it (3 seeds; fewer steps for a dearer option, the schedule fitted to
them); within the tolerance equal steps are equal CPU time.

    python benchmarks/bench_positives.py --out bench-out/positives --steps 300 --threads 1 [--options one,all,...]

`--threads 1` (one torch thread per training process) is what the docs' runs used: with two, other jobs on this
2-core machine made the steps many times slower (threads waiting on each other), and the CPU time with them.

Writes OUT/positives.json (every run: figures, CPU and wall seconds; copied to `--record`, default
docs/bench/flickr8k_positives.json), OUT/positives.md (the tables, mean ± std over seeds) and the plot (`--plot`,
default docs/img/flickr8k_positives.png). The docs' figures: `--steps 300 --options one,all,neg,nested`, then
`--steps 1800 --options one,all`, then the first command again (it only gathers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "one": [],
    "all": ["loss.positives=all"],
    "neg": ["loss.hard_negatives=4"],
    "nested": ["model.nested_dims=[64,128]"],  # NESTED_DIMS and the full 256
    "all+neg": ["loss.positives=all", "loss.hard_negatives=4"],
}
NESTED_DIMS = [64, 128]
# today's choices named, so each option differs from today by its own overrides whatever the config adopts
TODAY = ["loss.positives=one", "loss.hard_negatives=0", "model.nested_dims=[]"]
LABELS = {"one": "today: one caption drawn", "all": "all captions (multi-positive)", "neg": "hard negatives (4)",
          "nested": "nested dims 64/128/256", "all+neg": "all captions + hard negatives"}  # fmt: skip
METRICS = [(d, k) for d in ("image_to_text", "text_to_image") for k in ("R@1", "R@5", "R@10")]


def cli(args: list[str]) -> float:
    """`l2c ARGS` in a subprocess; returns its CPU seconds (user + system, its data workers included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "l2c.cli", *args], check=True, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def prepare(out: Path, data: Path, mine: bool) -> object:
    """Shards and caption caches of both splits (once), and the train cache's mined negatives when asked."""
    from l2c.apps.demo_photos import PhotoDemoSettings, embed_done, run_embed, run_shards, shards_done

    s = PhotoDemoSettings(out=out / "demo", data=data, progress=False)
    if not shards_done(s):
        run_shards(s)
    if not embed_done(s):
        run_embed(s)
    if mine and not (s.cache("train") / "negatives" / "negatives.json").exists():
        cli(["mine-negatives", "--text-cache", str(s.cache("train")), "--no-progress"])
    return s


def run_one(s, out: Path, option: str, steps: int, seed: int, threads: int) -> dict:
    """Train and evaluate one grid point (skipped when its result is there)."""
    from l2c.apps.demo_photos import shards

    name = f"{option}-{steps}-seed{seed}"
    result_path = out / "runs" / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    run, ev = out / "runs" / name, out / "eval" / name
    overrides = [*TODAY, *OPTIONS[option], f"steps={steps}", f"seed={seed}", f"torch_threads={threads}"]
    images = [a for p in shards(s, "train") for a in ("--images", p)]
    t0 = time.time()
    resume = ["--resume"] if any((run / "checkpoints").glob("*")) else ["--overwrite"] if run.exists() else []
    cpu = cli(["train-vision", *images, "--text-cache", str(s.cache("train")), "--out", str(run), "--config",
               "flickr8k_cpu", "--no-progress", *resume, *overrides])  # fmt: skip
    wall = time.time() - t0
    summary = json.loads((run / "summary.json").read_text())
    if resume == ["--resume"]:  # an interrupted run: its CPU time before the stop is not known; scale from the steps run now
        done = summary["step"] - (summary.get("resumed_from") or 0)
        cpu, wall = cpu * steps / max(1, done), wall * steps / max(1, done)
    dev = [a for p in shards(s, "dev") for a in ("--images", p)]
    if ev.exists():
        import shutil

        shutil.rmtree(ev)
    cli(["eval-retrieval", "--model", str(run), *dev, "--text-cache", str(s.cache("dev")), "--out", str(ev)])
    got = json.loads((ev / "eval.json").read_text())
    result = {"option": option, "steps": steps, "seed": seed, "overrides": overrides, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1),
              "final_loss": summary["final_loss"],
              **{f"{d}_{k}": got[d][k] for d, k in METRICS}}  # fmt: skip
    if got.get("nested"):  # eval-retrieval's recall at each nested dim
        result["nested"] = got["nested"]
    result_path.write_text(json.dumps(result, indent=1))
    return result


def cut_recall(s, out: Path, result: dict, dims: list[int]) -> dict:
    """Today's model cut to the nested dims (first d values, re-normalised) on the dev photos: what nested
    training is measured against (`l2c.eval.nested`)."""
    from l2c.apps.demo_photos import shards
    from l2c.cache import TextCache
    from l2c.eval.features import extract_image_features
    from l2c.eval.model import load_model
    from l2c.eval.nested import recall_by_dim
    from l2c.eval.retrieval import caption_gallery

    net = load_model(out / "runs" / f"{result['option']}-{result['steps']}-seed{result['seed']}", "cpu")
    img = extract_image_features(net, shards(s, "dev"), 64, "cpu")
    texts = caption_gallery(TextCache(s.cache("dev")), img.keys, None, net)
    return recall_by_dim(img.keys, img.features, texts, dims)


def equal_cpu_steps(steps: int, base: float, cost: float) -> int:
    """Steps of an option costing `cost` CPU seconds per `steps` that match today's `base` (rounded to 10)."""
    return int(round(steps * base / cost / 10) * 10)


def aggregate(results: list[dict]) -> dict:
    """(option, steps) -> mean, std and seeds of every figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["option"], r["steps"]), []).append(r)
    out = {}
    for (option, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], list(OPTIONS).index(kv[0][0]))):
        row = {"option": option, "steps": steps, "seeds": sorted(r["seed"] for r in rs)}
        for m in [f"{d}_{k}" for d, k in METRICS] + ["cpu_s", "wall_s", "final_loss"]:
            v = np.array([r[m] for r in rs], float)
            row[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        out[f"{option}@{steps}"] = row
    return out


def table(rows: dict, base_steps: int) -> str:
    """Markdown table: mean ± std over seeds, CPU minutes per run."""
    head = ("| option | steps | seeds | I→T R@1 | R@5 | R@10 | T→I R@1 | R@5 | R@10 | CPU min | loss |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for row in rows.values():
        cells = [f"{row[f'{d}_{k}']['mean']:.2f} ± {row[f'{d}_{k}']['std']:.2f}" for d, k in METRICS]
        lines.append(f"| {LABELS[row['option']]} | {row['steps']} | {len(row['seeds'])} | " + " | ".join(cells)
                     + f" | {row['cpu_s']['mean'] / 60:.1f} | {row['final_loss']['mean']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def nested_table(results: list[dict]) -> str:
    """R@1 at each dim: the nested runs, and today's runs cut to the same dims (mean ± std over seeds)."""
    lines = ["| model (300 steps) | dims | I→T R@1 | R@5 | R@10 | T→I R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|---|"]
    for label, key, option in (("nested dims 64/128/256", "nested", "nested"), ("today, cut", "cut", "one")):
        rs = [r for r in results if r["option"] == option and key in r]
        for d in sorted({int(d) for r in rs for d in r[key]}):
            cells = []
            for direction, k in METRICS:
                v = np.array([r[key][str(d)][direction][k] for r in rs])
                cells.append(f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}")
            lines.append(f"| {label} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict, path: Path, base_steps: int) -> None:
    """R@1 both ways, mean ± std over seeds: one row of panels per schedule (short grid, full schedule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[n for n in rows if rows[n]["steps"] < 1000], [n for n in rows if rows[n]["steps"] >= 1000]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 3.8 * len(groups)), squeeze=False)
    for row, names in enumerate(groups):
        for col, (d, title) in enumerate((("image_to_text", "image→text R@1"), ("text_to_image", "text→image R@1"))):
            ax = axes[row][col]
            means = [rows[n][f"{d}_R@1"]["mean"] for n in names]
            stds = [rows[n][f"{d}_R@1"]["std"] for n in names]
            colours = ["#888888" if rows[n]["option"] == "one" else "#3a7bd5" for n in names]
            ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colours)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([f"{rows[n]['option']}\n{rows[n]['steps']} steps\n{rows[n]['cpu_s']['mean'] / 60:.1f} CPU min"
                                for n in names], fontsize=8)  # fmt: skip
            ax.set_title(f"{title}, 1,000 dev photos vs 5,000 captions", fontsize=10)
            ax.axhline(0.1, color="k", lw=0.5, ls=":")
            ax.set_ylabel("R@1 (%), mean ± std, 3 seeds")
    fig.suptitle("Flickr8k photo demo: today, one caption drawn per step (grey), against each option (blue)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "positives")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--options", default="one,all,neg,nested")
    ap.add_argument("--cpu-tolerance", type=float, default=0.05, help="relative CPU/step difference read as equal")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "flickr8k_positives.png")
    ap.add_argument("--record", type=Path, default=ROOT / "docs" / "bench" / "flickr8k_positives.json",
                    help="a copy of OUT/positives.json kept with the docs")
    ap.add_argument("--no-equal-cpu", action="store_true", help="skip the equal-CPU-time rows of today")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    options = [o for o in a.options.split(",") if o]
    seeds = [int(x) for x in a.seeds.split(",")]
    s = prepare(out, a.data, any("hard_negatives" in " ".join(OPTIONS[o]) for o in options))
    for seed in seeds:  # seed-major: every option has some seeds early
        for option in ["one"] + [o for o in options if o != "one"]:
            run_one(s, out, option, a.steps, seed, a.threads)
    if not a.no_equal_cpu:
        base = np.mean([run_one(s, out, "one", a.steps, seed, a.threads)["cpu_s"] for seed in seeds])
        for option in options:
            cost = np.mean([run_one(s, out, option, a.steps, seed, a.threads)["cpu_s"] for seed in seeds])
            if abs(cost / base - 1) > a.cpu_tolerance:  # the steps today's CPU time buys this option
                for seed in seeds:
                    run_one(s, out, option, equal_cpu_steps(a.steps, base, cost), seed, a.threads)
    if "nested" in options:  # today's model cut to the same dims, for the nested rows to be read against
        for seed in seeds:
            path = out / "runs" / f"one-{a.steps}-seed{seed}.json"
            r = json.loads(path.read_text())
            if "cut" not in r:
                r["cut"] = cut_recall(s, out, r, NESTED_DIMS)
                path.write_text(json.dumps(r, indent=1))
    results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    rows = aggregate(results)
    record = json.dumps({"rows": rows, "runs": results, "cpu_count": os.cpu_count()}, indent=1)
    (out / "positives.json").write_text(record)
    a.record.parent.mkdir(parents=True, exist_ok=True)
    a.record.write_text(record + "\n")
    md = table(rows, a.steps) + "\n\n" + nested_table(results)
    (out / "positives.md").write_text(md + "\n")
    print(md)
    plot(rows, a.plot, a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
