"""Training curves from `metrics.jsonl` as a PNG (matplotlib Agg)."""

from __future__ import annotations

import json
from pathlib import Path

from l2c import atomic

PANELS = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("logit_scale", "logit scale"),
    ("images_per_s", "images/s"),
)


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
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
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)
