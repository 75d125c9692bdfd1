"""How results are shown and kept: rich tables and progress, `eval.json`, PNG plots (matplotlib Agg)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from l2c import atomic

console = Console(stderr=True)
EVAL_JSON = "eval.json"
DIRECTIONS = {"image_to_text": "image→text", "text_to_image": "text→image"}


@contextmanager
def progress(description: str, total: int | None, unit: str = "items"):
    """A rich progress bar with rate and ETA; yields `advance(n)`."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            t = bar.tasks[task]
            if t.speed:
                bar.update(task, rate=f"{t.speed:,.0f} {unit}/s")

        yield advance


def fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def write_eval_json(out_dir: str | Path, result: dict) -> Path:
    path = Path(out_dir) / EVAL_JSON
    atomic.write_json(path, result)
    return path


def save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retrieval_table(result: dict, title: str = "Retrieval recall (%)") -> Table:
    ks = list(result["image_to_text"])
    table = Table(title=title)
    table.add_column("direction")
    table.add_column("texts")
    for k in ks:
        table.add_column(k, justify="right")
    fields = result.get("fields", [])
    overall = "all fields" if len(fields) != 1 else fields[0]
    rows = [(overall, result)] + list(result.get("per_field", {}).items())
    for name, r in rows:
        for direction, label in DIRECTIONS.items():
            table.add_row(label, name, *(fmt(r[direction][k]) for k in ks))
    return table


def missing_summary(result: dict) -> str | None:
    m = result.get("missing", {})
    if not m.get("images_without_text") and not m.get("texts_without_image"):
        return None
    return (
        f"[yellow]{m['images_without_text']} image(s) without caption (kept as distractors, not queried): "
        f"{m['image_keys'][:5]}; {m['texts_without_image']} caption(s) without image (left out): "
        f"{m['text_keys'][:5]} — all listed in eval.json[missing]"
    )


def plot_recall_curves(result: dict, path: str | Path) -> Path:
    plt = _pyplot()
    curves = result["curves"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for (direction, label), style in zip(DIRECTIONS.items(), ("-", "--"), strict=True):
        ax.plot(curves["k"], curves[direction], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{result['n_images']} images, {result['n_texts']} captions")
    ax.legend()
    return save_figure(fig, path)


def cra_table(result: dict) -> Table:
    table = Table(title="Caption retrieval accuracy (%)")
    for col in ("query → gallery", "n", "skipped", "CRA top-1", "top-5"):
        table.add_column(col, justify="left" if col.startswith("query") else "right")
    table.add_row(
        f"{result.get('query_field', 'first')} → {result.get('gallery_field', 'second')}",
        str(result["n"]),
        str(result["n_skipped"]),
        fmt(result["cra_top1"]),
        fmt(result["cra_top5"]),
    )
    return table


def zeroshot_table(result: dict) -> Table:
    table = Table(title="Zero-shot classification")
    for col in ("classes", "images", "skipped", "top-1 (%)", "top-5 (%)"):
        table.add_column(col, justify="right")
    table.add_row(
        str(result["n_classes"]),
        str(result["n_images"]),
        str(result["n_skipped"]),
        fmt(result["top1"]),
        fmt(result["top5"]),
    )
    return table


def confused_pairs_table(pairs: list[dict]) -> Table:
    table = Table(title="Most confused (true → predicted)")
    for col in ("true", "predicted", "count", "% of true class"):
        table.add_column(col, justify="right" if col in ("count", "% of true class") else "left")
    for p in pairs:
        table.add_row(p["true"], p["predicted"], str(p["count"]), fmt(p["percent"]))
    return table


def plot_confusion(matrix: np.ndarray, classes: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (true class rows, predicted columns)."""
    plt = _pyplot()
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    n = len(classes)
    size = min(4 + 0.35 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Zero-shot confusion matrix")
    return save_figure(fig, path)
