"""How results are shown and kept: rich tables, `eval.json`, PNG plots (matplotlib Agg)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from l2c import atomic

console = Console(stderr=True)
EVAL_JSON = "eval.json"
DIRECTIONS = {"image_to_text": "image→text", "text_to_image": "text→image"}


def fmt(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def rounded(obj, places: int = 4):
    """`obj` with every float rounded for people: `places` decimals (14.000000000000002 -> 14.0), and
    `places` significant digits below 0.01, so small numbers keep their meaning; ints, NaN and inf unchanged."""
    if isinstance(obj, float):
        if not math.isfinite(obj) or obj == 0:
            return obj
        return float(f"{obj:.{places}g}") if abs(obj) < 0.01 else round(obj, places)
    if isinstance(obj, dict):
        return {k: rounded(v, places) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, places) for v in obj]
    if isinstance(obj, np.generic):
        return rounded(obj.item(), places)
    return obj


def write_eval_json(out_dir: str | Path, result: dict) -> Path:
    """OUT/eval.json with its figures rounded (`rounded`)."""
    path = Path(out_dir) / EVAL_JSON
    atomic.write_json(path, rounded(result))
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


# ------------------------------------------------------------------------------ eval-suite summaries

SUITE_HEADLINE = {"retrieval": (("image_to_text/R@1", "I2T"), ("text_to_image/R@1", "T2I")),
                  "zeroshot": (("zeroshot/top1", "top-1"),)}  # fmt: skip


def metric_values(entry: dict) -> dict[str, float | None]:
    """A set's headline numbers, flat: `image_to_text/R@1`, ..., `cra/cra_top1`, `zeroshot/top1`."""
    flat: dict[str, float | None] = {}
    for group in ("image_to_text", "text_to_image", "cra", "zeroshot"):
        for k, v in (entry.get(group) or {}).items():
            if (k.startswith("R@") or k.startswith("cra_top") or k in ("top1", "top5")) and not isinstance(v, bool):
                flat[f"{group}/{k}"] = v
    return flat


def suite_columns(sets) -> list[dict]:
    """The paper's columns: I2T and T2I R@1 per retrieval set, top-1 per zero-shot set, in suite order."""
    return [{"set": s.name, "metric": m, "label": f"{s.title} {short}"}
            for s in sets for m, short in SUITE_HEADLINE[s.task]]  # fmt: skip


def _suite_value(result: dict, column: dict) -> float | None:
    entry = result.get("sets", {}).get(column["set"])
    return None if entry is None else metric_values(entry).get(column["metric"])


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}"


def suite_rows(result: dict, other: dict | None = None) -> list[tuple[str, list[str]]]:
    """(row name, cells): this model, the other, and their difference."""
    cols = result["columns"]
    rows = [(result.get("model_name") or result["model"], [fmt(_suite_value(result, c)) for c in cols])]
    if other is not None:
        name = other.get("model_name") or other.get("model", "other")
        rows.append((name, [fmt(_suite_value(other, c)) for c in cols]))
        deltas = []
        for c in cols:
            a, b = _suite_value(result, c), _suite_value(other, c)
            deltas.append(_signed(a - b if a is not None and b is not None else None))
        rows.append((f"Δ ({rows[0][0]} − {name})", deltas))
    return rows


def suite_table(result: dict, other: dict | None = None) -> Table:
    table = Table(title=f"eval-suite {result['suite']}: R@1 (%) / zero-shot top-1 (%)")
    table.add_column("model")
    for c in result["columns"]:
        table.add_column(c["label"], justify="right")
    for name, cells in suite_rows(result, other):
        table.add_row(name, *cells)
    return table


def suite_markdown(result: dict, other: dict | None = None) -> str:
    """suite.md: the paper's table (a row per model), then every set's recall@K, CRA, zero-shot, skipped sets."""
    cols = result["columns"]
    lines = [f"# eval-suite `{result['suite']}`", "",
             f"Model `{result['model']}`, data `{result['data']}`, text encoder `{result.get('text_encoder')}`.", "",
             "| model | " + " | ".join(c["label"] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]  # fmt: skip
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in suite_rows(result, other)]
    lines += ["", "I2T: image→text, T2I: text→image recall@1 (%); zero-shot: top-1 accuracy (%); "
              "— where a set was not evaluated.", ""]  # fmt: skip
    ks = [f"R@{k}" for k in result.get("ks", [1, 5, 10])]
    retrieval = {n: e for n, e in result["sets"].items() if e["task"] == "retrieval"}
    if retrieval:
        lines += ["## Retrieval", "", "| set | images | captions | " + " | ".join(f"I2T {k}" for k in ks) + " | "
                  + " | ".join(f"T2I {k}" for k in ks) + " |", "|---|---:|---:|" + "---:|" * (2 * len(ks))]
        for e in retrieval.values():
            cells = [fmt(e["image_to_text"].get(k)) for k in ks] + [fmt(e["text_to_image"].get(k)) for k in ks]
            lines.append(f"| {e['title']} | {e['n_images']} | {e['n_texts']} | " + " | ".join(cells) + " |")
        lines.append("")
    for e in result["sets"].values():
        if "cra" in e:
            c = e["cra"]
            lines.append(f"CRA on {e['title']} ({c['query_field']} → {c['gallery_field']}, {c['n']} images): "
                         f"top-1 {fmt(c['cra_top1'])}, top-5 {fmt(c['cra_top5'])}.")
        if "zeroshot" in e:
            z = e["zeroshot"]
            lines.append(f"Zero-shot {e['title']} ({z['n_images']} images, {z['n_classes']} classes × "
                         f"{z['n_templates']} templates): top-1 {fmt(z['top1'])}, top-5 {fmt(z['top5'])}.")
    if other is not None:
        lines += ["", f"## Differences: `{result['model']}` − `{other.get('model')}` (percentage points)", "",
                  "| set | metric | this | other | Δ |", "|---|---|---:|---:|---:|"]

        for name, d in result.get("compare", {}).get("diff", {}).items():
            mine, theirs = metric_values(result["sets"][name]), metric_values(other["sets"][name])
            for k, v in d.items():
                lines.append(f"| {result['sets'][name]['title']} | {k} | {fmt(mine[k])} | {fmt(theirs[k])} | {_signed(v)} |")
    if result["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{n}`: {why}" for n, why in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot_suite(result: dict, other: dict | None, path: str | Path) -> Path:
    """Grouped bars: the headline number of every column, one bar per model."""
    plt = _pyplot()
    cols = result["columns"]
    runs = [(result.get("model_name") or result["model"], result)]
    if other is not None:
        runs.append((other.get("model_name") or other.get("model", "other"), other))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cols) + 2), 4))
    width = 0.8 / len(runs)
    for j, (name, res) in enumerate(runs):
        vals = [_suite_value(res, c) for c in cols]
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(cols))]
        ax.bar(xs, [v if v is not None else 0 for v in vals], width, label=name)
    ax.set_xticks(range(len(cols)), [c["label"] for c in cols], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("R@1 / top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"eval-suite {result['suite']}")
    ax.legend()
    return save_figure(fig, path)
