"""`make demo`: the whole job end to end on procedural data, on a laptop CPU in about ten minutes.

    python -m l2c.apps.demo --out demo-out

Stages, each skipped when its output is already complete (a rerun resumes where the last one stopped):

    1 make-demo-data   demo-out/data/{train,val}/shard-*.tar, classes.txt, templates.txt
    2 embed-captions   demo-out/cache/{train,val}: MiniLM vectors of `txt` and `json:long_caption`
    3 train-vision     demo-out/run: a small ViT from random weights against the cached vectors (configs/demo.yaml)
    4 eval-retrieval   demo-out/eval/retrieval: recall@K on the held-out split
    5 eval-zeroshot    demo-out/eval/zeroshot: accuracy over the 6 shape classes

The results land in `demo-out/eval.json` (retrieval and zero-shot figures, chance levels, stage timings) and a
final table; plots stay beside each stage's output and are listed in `demo-out/report.md`. Every stage goes
through `l2c.cli.main([...])`, exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from l2c import atomic
from l2c.errors import JobFailed

console = Console()
FIELDS = ("txt", "json:long_caption")


class StageError(JobFailed):
    """A stage ran but did not leave complete output."""


@dataclass
class DemoSettings:
    out: Path
    n: int = 5000
    val_n: int = 500
    image_size: int = 64
    seed: int = 0
    config: str = "demo"  # configs/demo.yaml
    train_overrides: list[str] = field(default_factory=list)
    max_minutes: float | None = None  # cap on the training stage (it resumes on the next run)
    progress: bool = True

    @property
    def data(self) -> Path:
        return self.out / "data"

    def cache(self, split: str) -> Path:
        return self.out / "cache" / split

    @property
    def run(self) -> Path:
        return self.out / "run"

    def eval_dir(self, kind: str) -> Path:
        return self.out / "eval" / kind


def registered_commands() -> set[str]:
    import typer

    from l2c.cli import app

    return set(typer.main.get_command(app).commands)


def cli(argv: list[str]) -> None:
    """Run one `l2c` command in-process, echoing it the way a user would type it."""
    from l2c.cli import main

    console.print(f"[dim]$ l2c {' '.join(argv)}", soft_wrap=True)
    rc = main(argv)
    if rc:
        raise StageError(f"`l2c {argv[0]}` exited with status {rc} (its message is above)")


def shards(s: DemoSettings, split: str) -> list[str]:
    info = json.loads((s.data / "info.json").read_text())
    return [str(s.data / p) for p in info["splits"][split]["shards"]]


# ------------------------------------------------------------------------------------------- stages


def data_done(s: DemoSettings) -> bool:
    from l2c.data.demo_data import DemoDataConfig, is_complete

    return is_complete(s.data, DemoDataConfig(n=s.n, val_n=s.val_n, image_size=s.image_size, seed=s.seed))


def run_data(s: DemoSettings) -> None:
    cli(["make-demo-data", str(s.data), "--n", str(s.n), "--val-n", str(s.val_n), "--image-size",
         str(s.image_size), "--seed", str(s.seed), "--overwrite", "--preview"])


def embed_done(s: DemoSettings) -> bool:
    from l2c.cache import CacheError, TextCache

    try:
        return all(
            all(TextCache(s.cache(split)).shard_for_source(src) is not None for src in shards(s, split))
            for split in ("train", "val")
        )
    except (CacheError, FileNotFoundError):
        return False


def run_embed(s: DemoSettings) -> None:
    for split in ("train", "val"):
        fields = [a for f in FIELDS for a in ("--text-field", f)]
        cli(["embed-captions", *shards(s, split), "--out", str(s.cache(split)), "--model", "minilm", *fields,
             *([] if s.progress else ["--no-progress"])])


def train_summary(s: DemoSettings) -> dict | None:
    p = s.run / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def train_done(s: DemoSettings) -> bool:
    summary = train_summary(s)
    return bool(summary and summary.get("finished") and (s.run / "export").exists())


def train_vision(out: Path, images: list[str], cache: Path, config: str, max_minutes: float | None,
                 progress: bool, overrides: list[str]) -> None:
    """`l2c train-vision` into `out`, resuming a run already there; one stopped early is a StageError."""
    resume = ["--resume"] if (out / "config.yaml").exists() else []
    cap = ["--max-minutes", str(max_minutes)] if max_minutes else []
    cli(["train-vision", *[a for p in images for a in ("--images", p)], "--text-cache", str(cache), "--out", str(out),
         "--config", config, *resume, *cap, *([] if progress else ["--no-progress"]), *overrides])
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    if summary and not summary.get("finished"):
        raise StageError(f"training stopped at step {summary.get('step')} of {summary.get('steps')} "
                         f"({summary.get('stopped_by')}); run the demo again to resume it")


def run_train(s: DemoSettings) -> None:
    train_vision(s.run, shards(s, "train"), s.cache("train"), s.config, s.max_minutes, s.progress,
                 s.train_overrides)


def eval_json(s, kind: str) -> dict | None:
    """`eval.json` of an eval stage (`s.eval_dir(kind)`: either demo's settings), or None."""
    p = s.eval_dir(kind) / "eval.json"
    return json.loads(p.read_text()) if p.exists() else None


def _fresh(s: DemoSettings, kind: str) -> bool:
    """An eval result newer than the model it measured."""
    p, model = s.eval_dir(kind) / "eval.json", s.run / "summary.json"
    return p.exists() and model.exists() and p.stat().st_mtime >= model.stat().st_mtime


def run_retrieval(s: DemoSettings) -> None:
    images = [a for p in shards(s, "val") for a in ("--images", p)]
    cli(["eval-retrieval", "--model", str(s.run), *images, "--text-cache", str(s.cache("val")),
         "--out", str(s.eval_dir("retrieval"))])


def run_zeroshot(s: DemoSettings) -> None:
    images = [a for p in shards(s, "val") for a in ("--images", p)]
    cli(["eval-zeroshot", "--model", str(s.run), *images, "--classes", str(s.data / "classes.txt"),
         "--templates", str(s.data / "templates.txt"), "--label-field", "json:label",
         "--out", str(s.eval_dir("zeroshot"))])


# name, command, is-complete, run, stages it needs
STAGES = (
    ("data", "make-demo-data", data_done, run_data, ()),
    ("embed", "embed-captions", embed_done, run_embed, ("data",)),
    ("train", "train-vision", train_done, run_train, ("embed",)),
    ("retrieval", "eval-retrieval", lambda s: _fresh(s, "retrieval"), run_retrieval, ("train",)),
    ("zeroshot", "eval-zeroshot", lambda s: _fresh(s, "zeroshot"), run_zeroshot, ("train",)),
)


# ------------------------------------------------------------------------------------------ driver


def run_stages(stages: tuple, s) -> tuple[dict[str, dict], float]:
    """Run (or skip, when complete) each `(name, command, done, run, needs)` stage; a failed stage blocks
    the stages that need it. Returns ({name: status}, seconds)."""
    s.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    available = registered_commands()
    status: dict[str, dict] = {}
    t_start = time.perf_counter()
    for i, (name, command, done, run, needs) in enumerate(stages, 1):
        console.rule(f"[bold][{i}/{len(stages)}] {command}")
        t0 = time.perf_counter()
        blocked = [n for n in needs if status[n]["status"] not in ("done", "skipped")]
        if blocked:
            state, detail = "blocked", f"needs stage {', '.join(blocked)}"
        elif command not in available:
            state, detail = "unavailable", f"`l2c {command}` is not registered in this build"
        elif done(s):
            state, detail = "skipped", "output already complete"
        else:
            try:
                run(s)
                state, detail = ("done", "") if done(s) else ("failed", "the command left no complete output")
            except StageError as e:
                state, detail = "failed", str(e)
            except Exception as e:  # a stage's error is reported; the stages that need it are blocked
                state, detail = "failed", f"{type(e).__name__}: {e}"
        status[name] = {"command": command, "status": state, "detail": detail,
                        "seconds": round(time.perf_counter() - t0, 1)}
        style = {"done": "green", "skipped": "cyan"}.get(state, "red")
        console.print(f"[{style}]{command}: {state}" + (f" — {detail}" if detail else ""), soft_wrap=True)
    return status, time.perf_counter() - t_start


def run_demo(s: DemoSettings) -> dict:
    """Run (or resume) every stage; returns the content of `OUT/eval.json`."""
    status, seconds = run_stages(STAGES, s)
    result = summarize(s, status, seconds)
    atomic.write_json(s.out / "eval.json", result)
    write_report(s, result)
    print_results(result)
    return result


def summarize(s: DemoSettings, status: dict, seconds: float) -> dict:
    retrieval, zeroshot = eval_json(s, "retrieval"), eval_json(s, "zeroshot")
    n_classes = len((s.data / "classes.txt").read_text().split()) if (s.data / "classes.txt").exists() else None
    return {
        "ok": all(v["status"] in ("done", "skipped") for v in status.values()),
        "settings": {"n": s.n, "val_n": s.val_n, "image_size": s.image_size, "seed": s.seed, "config": s.config,
                     "train_overrides": s.train_overrides, "fields": list(FIELDS)},
        "stages": status,
        "seconds": round(seconds, 1),
        "train": train_summary(s) if status["train"]["status"] in ("done", "skipped") else None,
        "retrieval": retrieval if status["retrieval"]["status"] in ("done", "skipped") else None,
        "zeroshot": zeroshot if status["zeroshot"]["status"] in ("done", "skipped") else None,
        "chance": {"zeroshot_top1": round(100 / n_classes, 2) if n_classes else None,
                   "recall_at_1": round(100 / s.val_n, 2) if s.val_n else None},
    }


def _plots(s: DemoSettings) -> list[Path]:
    return sorted(s.out.rglob("*.png"))


def write_report(s: DemoSettings, result: dict, title: str = "l2c demo report") -> None:
    lines = [f"# {title}", "", f"Output: `{s.out}`, total {result['seconds']} s.", "",
             "| stage | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {v['command']} | {v['status']} | {v['seconds']} | {v['detail']} |" for v in result["stages"].values()]
    lines += ["", "Figures: `eval.json` (this directory), per stage `eval/*/eval.json`, `run/summary.json`.", ""]
    lines += [f"![{p.stem}]({p.relative_to(s.out)})" for p in _plots(s)]
    atomic.write_text(s.out / "report.md", "\n".join(lines) + "\n")


def _numbers(d, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) for every number in a nested dict, for the final table."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _numbers(v, f"{prefix}{k}.")
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out.append((prefix[:-1], float(d)))
    return out


def print_results(result: dict, title: str = "l2c demo", per_field: bool = True) -> None:
    table = Table(title=title)
    for col in ("stage", "status", "seconds"):
        table.add_column(col)
    for v in result["stages"].values():
        style = {"done": "green", "skipped": "cyan"}.get(v["status"], "red")
        table.add_row(v["command"], f"[{style}]{v['status']}", f"{v['seconds']:.0f}")
    console.print(table)
    figures = Table(title="held-out results (%)")
    figures.add_column("metric")
    figures.add_column("value", justify="right")
    for section in ("retrieval", "zeroshot", "control"):
        for key, value in headline(result.get(section) or {}, per_field):
            figures.add_row(f"{section}: {key}", f"{value:.2f}")
    for key, value in result["chance"].items():
        if value is not None:
            figures.add_row(f"chance: {key}", f"{value:.4g}")
    console.print(figures)


def headline(section: dict, per_field: bool = True) -> list[tuple[str, float]]:
    """The figures worth a row: recall@K (per caption field too, if `per_field`) and accuracies, as percentages."""
    rows = []
    keys = ("image_to_text", "text_to_image", "per_field", "top1", "top5") if per_field else (
        "image_to_text", "text_to_image", "top1", "top5")
    for k, v in _numbers({key: section[key] for key in keys if key in section}):
        if k.split(".")[-1] in ("R@1", "R@5", "R@10", "top1", "top5"):
            rows.append((k, v))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m l2c.apps.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default demo-out)")
    ap.add_argument("--n", type=int, default=5000, help="training images")
    ap.add_argument("--val-n", type=int, default=500, help="held-out images")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="demo", help="train-vision config (default configs/demo.yaml)")
    ap.add_argument("--max-minutes", type=float, default=None, help="cap on the training stage (resumable)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="train-vision config overrides, e.g. steps=50 batch_size=32")
    a = ap.parse_args(argv)
    s = DemoSettings(out=a.out, n=a.n, val_n=a.val_n, image_size=a.image_size, seed=a.seed, config=a.config,
                     train_overrides=a.overrides, max_minutes=a.max_minutes, progress=not a.no_progress)
    result = run_demo(s)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
