"""Training curves as PNG (matplotlib Agg): the vision run's panels and the text fine-tune's loss and CRA."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from l2c import atomic
from l2c.trainer.runlog import read_metrics

PANELS = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("logit_scale", "logit scale"),
    ("images_per_s", "images/s"),
)


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """The vision trainer's curves (loss, lr, logit scale, images/s) against step; None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, Path(out_png), dpi=110)
    plt.close(fig)
    return Path(out_png)



def _save(fig, path: Path, dpi: int = 120) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **({"bbox_inches": "tight"} if dpi == 120 else {}))


def plot_loss(records: list[dict], path: str | Path, title: str = "") -> bool:
    """Training loss against step, one panel per stage (MNTP, contrastive). False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("type") == "train":
            stages[r["stage"]].append((r["step"], r["loss"]))
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    for ax, (stage, pts) in zip(axes[0], sorted(stages.items(), key=lambda kv: kv[0] != "mntp"), strict=True):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, lw=0.8, alpha=0.5, label="loss")
        if len(ys) >= 10:
            w = max(len(ys) // 20, 2)
            smooth = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1.6, label=f"mean of {w}")
        ax.set_xlabel("step")
        ax.set_ylabel("MNTP cross-entropy" if stage == "mntp" else "InfoNCE loss")
        ax.set_title(f"{title} {stage}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, Path(path))
    plt.close(fig)
    return True


def plot_cra(records: list[dict], path: str | Path, title: str = "") -> bool:
    """CRA top-1 against contrastive step, one line per eval set (training-time subset and full sets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("type") == "eval":
            label = f"{r['set']} ({r['n']} images)"
            lines[label].append((r["step"], r["cra_top1"]))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, pts in sorted(lines.items()):
        pts = sorted(set(pts))
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("contrastive step")
    ax.set_ylabel("CRA top-1 (%)")
    ax.set_title(title or "Caption retrieval accuracy during fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(path))
    plt.close(fig)
    return True
