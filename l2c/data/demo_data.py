"""Procedural demo data: coloured shapes on varied backgrounds, with short and dense captions.

Each scene holds 1-3 shapes (6 kinds, 8 colours, 3 sizes) on a solid, gradient or noise background.
The main object is always the single large one, and its kind is the scene's zero-shot `label`.
Captions are generated from the same structured `objects` list that is stored with each sample:

    txt                    "a red circle and a blue star"
    json.long_caption      "A large red circle on the left and a small blue star in the top right, on a plain
                            grey background. The red circle is to the left of, below and larger than the blue star."
    json.objects           [{"kind", "color", "size", "x", "y", "radius", "position", "rotation"}, ...]
    json.label / cls       "circle" / its index in classes.txt

Output layout (see docs/demo-data.md)::

    OUT/train/shard-000000.tar ...   keys train-00000000 ...
    OUT/val/shard-000000.tar ...     keys val-00000000 ... (held out: its own random stream)
    OUT/classes.txt                  one class name per line
    OUT/templates.txt                zero-shot prompt templates ({} = class name), one per line
    OUT/info.json                    settings, counts, shards; written last, it marks the output complete

Every sample is drawn from its own generator seeded by (seed, split, index), so the data is deterministic
given the seed and independent of shard size. Shards are written atomically (`AtomicShardWriter`).
"""

from __future__ import annotations

import io
import json
import math
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from l2c import atomic
from l2c.data.writer import AtomicShardWriter, encode_sample, list_shards
from l2c.errors import L2CError
from l2c.progress import ProgressBar

FORMAT_NAME = "l2c-demo-data"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges at 64px

KINDS = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 130, 30),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Muted mid-tones, each far (RGB distance > 90) from every object colour.
BACKGROUNDS = {
    "grey": (128, 128, 128),
    "beige": (190, 175, 150),
    "slate": (80, 95, 110),
    "olive": (120, 120, 80),
    "sage": (110, 140, 130),
    "taupe": (140, 120, 110),
}
BACKGROUND_STYLES = ("plain", "gradient", "noisy")
SIZES = {"small": 0.11, "medium": 0.17, "large": 0.25}  # radius as a fraction of the image side
SIZE_RANK = {"small": 0, "medium": 1, "large": 2}
POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
# Zero-shot prompts in the captions' own style ("a red circle and a blue star"); the label is the large object.
TEMPLATES = ("a {}.", "a large {}.", "a picture of a large {}.")
RELATION_MARGIN = 0.08  # centres closer than this (fraction of the side) get no left/right/above/below


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    outer = _regular(points, 1.0)
    inner_pts = _regular(points, inner, phase=-math.pi / 2 + math.pi / points)
    return [p for pair in zip(outer, inner_pts, strict=True) for p in pair]


_ARM = 0.32
# Unit polygons (x right, y down) and the rotation range (degrees) that keeps each kind recognisable.
SHAPES = {
    "square": ([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 15),
    "triangle": ([(x, y + 0.15) for x, y in _regular(3, 1.05)], 15),
    "star": (_star(), 36),
    "cross": ([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
               (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)], 15),
    "diamond": ([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], 10),
    "circle": (None, 0),
}


class DemoDataError(L2CError, ValueError):
    """Bad settings, or an output directory that holds data made with other settings."""


@dataclass
class DemoDataConfig:
    n: int = 5000
    val_n: int = 500
    image_size: int = 64
    shard_size: int = 1000
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3
    image_format: str = "jpg"  # jpg or png
    jpeg_quality: int = 92

    def validate(self) -> None:
        if self.n < 1 or self.val_n < 0:
            raise DemoDataError(f"need n >= 1 and val_n >= 0, got n={self.n}, val_n={self.val_n}")
        if self.image_size < 16:
            raise DemoDataError(f"image_size must be >= 16, got {self.image_size}")
        if self.shard_size < 1:
            raise DemoDataError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise DemoDataError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}..{self.max_objects}")
        if self.image_format not in ("jpg", "png"):
            raise DemoDataError(f"image_format must be jpg or png, got {self.image_format!r}")


# --------------------------------------------------------------------------------------------- scenes


def position_name(x: float, y: float) -> str:
    """The 3x3 grid cell of a centre in [0, 1]^2: 'top left', 'top', ..., 'center', ..., 'bottom right'."""
    row = ("top", "", "bottom")[min(int(y * 3), 2)]
    col = ("left", "", "right")[min(int(x * 3), 2)]
    return f"{row} {col}".strip() or "center"


def _place(rng: np.random.Generator, radii: list[float], tries: int = 60) -> list[tuple[float, float]] | None:
    """Non-overlapping centres (fractions of the side) for discs of the given radii, or None."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(math.hypot(x - cx, y - cy) >= (r + cr) * 1.05 for (cx, cy), cr in zip(centres, radii, strict=False)):
                centres.append((float(x), float(y)))
                break
        else:
            return None
    return centres


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 3) -> dict:
    """A scene description: background and a list of objects, the first being the single large one."""
    count = int(rng.integers(min_objects, max_objects + 1))
    while True:  # drop one object at a time until the shapes fit without overlapping
        sizes = ["large"] + [str(rng.choice(["small", "medium"])) for _ in range(count - 1)]
        radii = [SIZES[s] * float(rng.uniform(0.9, 1.1)) for s in sizes]
        centres = _place(rng, radii)
        if centres is not None:
            break
        count -= 1
    combos = [(c, k) for c in COLORS for k in KINDS]
    picks = rng.choice(len(combos), size=count, replace=False)  # no two objects share colour and kind
    objects = []
    for (color, kind), size, r, (x, y) in zip((combos[i] for i in picks), sizes, radii, centres, strict=True):
        max_rot = SHAPES[kind][1]
        objects.append({
            "kind": kind, "color": color, "size": size,
            "x": round(x, 4), "y": round(y, 4), "radius": round(r, 4),
            "position": position_name(x, y),
            "rotation": round(float(rng.uniform(-max_rot, max_rot)), 1),
        })
    bg_names = list(BACKGROUNDS)
    style = str(rng.choice(BACKGROUND_STYLES))
    background = {"style": style, "color": str(rng.choice(bg_names))}
    if style == "gradient":
        background["color2"] = str(rng.choice([b for b in bg_names if b != background["color"]]))
        background["angle"] = int(rng.integers(0, 8)) * 45
    return {"background": background, "objects": objects}


def _name(o: dict) -> str:
    return f"{o['color']} {o['kind']}"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relations(a: dict, b: dict) -> list[str]:
    """How `a` stands to `b`: 'to the left of', 'above', 'larger than', ... (from centres and size classes)."""
    out = []
    if a["x"] < b["x"] - RELATION_MARGIN:
        out.append("to the left of")
    elif a["x"] > b["x"] + RELATION_MARGIN:
        out.append("to the right of")
    if a["y"] < b["y"] - RELATION_MARGIN:
        out.append("above")
    elif a["y"] > b["y"] + RELATION_MARGIN:
        out.append("below")
    if SIZE_RANK[a["size"]] > SIZE_RANK[b["size"]]:
        out.append("larger than")
    elif SIZE_RANK[a["size"]] < SIZE_RANK[b["size"]]:
        out.append("smaller than")
    return out


def describe_background(bg: dict) -> str:
    if bg["style"] == "gradient":
        return _a(f"{bg['color']} to {bg['color2']} gradient background")
    return _a(f"{bg['style']} {bg['color']} background")


def short_caption(scene: dict) -> str:
    return _join([_a(_name(o)) for o in scene["objects"]])


def long_caption(scene: dict) -> str:
    """Every object's size, colour, kind and position, the background, and each pair's relations."""
    objs = scene["objects"]
    parts = [_a(f"{o['size']} {_name(o)} {POSITION_PHRASES[o['position']]}") for o in objs]
    text = _join(parts) + f", on {describe_background(scene['background'])}."
    text = text[0].upper() + text[1:]
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            rel = relations(a, b)
            if rel:
                text += f" The {_name(a)} is {_join(rel)} the {_name(b)}."
    return text


# ------------------------------------------------------------------------------------------ rendering


def _background(bg: dict, side: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(BACKGROUNDS[bg["color"]], dtype=np.float32)
    if bg["style"] == "plain":
        return np.broadcast_to(base, (side, side, 3)).copy()
    if bg["style"] == "gradient":
        t = math.radians(bg["angle"])
        coords = np.linspace(-1, 1, side, dtype=np.float32)
        proj = np.cos(t) * coords[None, :] + np.sin(t) * coords[:, None]
        w = ((proj - proj.min()) / (np.ptp(proj) + 1e-6))[..., None]
        return base * (1 - w) + np.array(BACKGROUNDS[bg["color2"]], dtype=np.float32) * w
    # noisy: low-frequency blotches (mostly brightness, a little hue) plus fine grain
    blotches = _upsample(rng.normal(0, 22, size=(5, 5)), side)[..., None]
    tint = np.stack([_upsample(rng.normal(0, 8, size=(5, 5)), side) for _ in range(3)], -1)
    grain = rng.normal(0, 10, size=(side, side, 1)).astype(np.float32)
    return base + blotches + tint + grain


def _upsample(a: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize((side, side), Image.BILINEAR))


def _draw_object(draw: ImageDraw.ImageDraw, o: dict, side: int) -> None:
    cx, cy, r = o["x"] * side, o["y"] * side, o["radius"] * side
    fill = COLORS[o["color"]]
    poly, _ = SHAPES[o["kind"]]
    if poly is None:
        rr = 0.92 * r
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
        return
    t = math.radians(o["rotation"])
    c, s = math.cos(t), math.sin(t)
    draw.polygon([(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in poly], fill=fill)


def render_scene(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    side = image_size * SUPERSAMPLE
    pixels = np.clip(_background(scene["background"], side, rng), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        _draw_object(draw, o, side)
    return img.resize((image_size, image_size), Image.BOX)


def encode_image(img: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def make_sample(split: str, index: int, cfg: DemoDataConfig) -> dict:
    """One webdataset sample, a pure function of (seed, split, index, settings)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    scene = sample_scene(rng, cfg.min_objects, cfg.max_objects)
    img = render_scene(scene, cfg.image_size, rng)
    label = scene["objects"][0]["kind"]
    meta = {
        "caption": short_caption(scene),
        "long_caption": long_caption(scene),
        "label": label,
        "label_index": KINDS.index(label),
        "objects": scene["objects"],
        "background": scene["background"],
    }
    key = f"{split}-{index:08d}"
    return encode_sample(key, encode_image(img, cfg.image_format, cfg.jpeg_quality), cfg.image_format,
                         meta["caption"], meta, cls=str(meta["label_index"]))


# ---------------------------------------------------------------------------------------------- writing


def _params(cfg: DemoDataConfig) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(cfg)}


def read_info(out: str | Path) -> dict | None:
    p = Path(out) / "info.json"
    return json.loads(p.read_text()) if p.exists() else None


def is_complete(out: str | Path, cfg: DemoDataConfig | None = None) -> bool:
    """True when OUT holds finished demo data (made with `cfg`'s settings, if given)."""
    out = Path(out)
    info = read_info(out)
    if info is None or (cfg is not None and info.get("params") != _params(cfg)):
        return False
    return all((out / s).exists() for split in info["splits"].values() for s in split["shards"])


def _clear(out: Path) -> None:
    (out / "info.json").unlink(missing_ok=True)  # first: a half-cleared directory is never "complete"
    for split in SPLITS:
        d = out / split
        if d.exists():
            for p in [*list_shards(d), *d.glob(".tmp-*")]:
                p.unlink()
    atomic.remove_stale_tmp(out)


def write_split(out: Path, split: str, n: int, cfg: DemoDataConfig, progress=None) -> dict:
    task = progress.add(split, total=n) if progress is not None else None
    labels: Counter[str] = Counter()
    objects: Counter[int] = Counter()
    with AtomicShardWriter(out / split, cfg.shard_size) as writer:
        for i in range(n):
            sample = make_sample(split, i, cfg)
            meta = json.loads(sample["json"])
            labels[meta["label"]] += 1
            objects[len(meta["objects"])] += 1
            writer.write(sample)
            if task is not None:
                progress.advance(1, task)
    return {
        "n": n,
        "key_prefix": f"{split}-",
        "shards": [f"{split}/{p.name}" for p in writer.shards],
        "label_counts": {k: labels[k] for k in KINDS},
        "objects_per_scene": {str(k): objects[k] for k in sorted(objects)},
    }


def make_demo_data(out: str | Path, cfg: DemoDataConfig | None = None, overwrite: bool = False,
                   show_progress: bool = True) -> dict:
    """Write the demo dataset to `out`; returns info.json's content (with `skipped: True` if already there)."""
    cfg = cfg or DemoDataConfig()
    cfg.validate()
    out = Path(out)
    info = read_info(out)
    if info is not None and info.get("params") == _params(cfg) and is_complete(out, cfg):
        return {**info, "skipped": True}
    if info is not None and info.get("params") != _params(cfg) and not overwrite:
        raise DemoDataError(
            f"{out} already holds demo data made with other settings ({out / 'info.json'}); "
            "pass --overwrite to replace it, or choose another output directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    t0 = time.perf_counter()
    with ProgressBar("images", enabled=show_progress) as progress:
        splits = {"train": write_split(out, "train", cfg.n, cfg, progress)}
        if cfg.val_n:
            splits["val"] = write_split(out, "val", cfg.val_n, cfg, progress)
    seconds = time.perf_counter() - t0
    atomic.write_text(out / "classes.txt", "".join(f"{k}\n" for k in KINDS))
    atomic.write_text(out / "templates.txt", "".join(f"{t}\n" for t in TEMPLATES))
    info = {
        "params": _params(cfg),
        "classes": list(KINDS),
        "colors": list(COLORS),
        "splits": splits,
        "fields": {"image": cfg.image_format, "short_caption": "txt", "long_caption": "json:long_caption",
                   "label": "json:label", "class_index": "cls"},
        "seconds": round(seconds, 2),
        "images_per_second": round((cfg.n + cfg.val_n) / max(seconds, 1e-9), 1),
    }
    atomic.write_json(out / "info.json", info)  # last: its presence marks the output complete
    return info


def print_summary(info: dict, out: str | Path, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    p = info["params"]
    table = Table(title="make-demo-data" + (" (already complete, skipped)" if info.get("skipped") else ""))
    for col in ("split", "images", "shards", *info["classes"]):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name, s in info["splits"].items():
        table.add_row(name, str(s["n"]), str(len(s["shards"])), *(str(s["label_counts"][k]) for k in info["classes"]))
    console.print(table)
    console.print(
        f"{p['image_size']}px {p['image_format']}, {p['min_objects']}-{p['max_objects']} objects, seed {p['seed']}, "
        f"{info['images_per_second']:,.0f} images/s; written to {out}",
        soft_wrap=True,
    )


def contact_sheet(out: str | Path, path: str | Path, split: str = "train", n: int = 12, cols: int = 4) -> Path:
    """A PNG grid of the first `n` images of a split with their short captions and labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from l2c.data.images import image_member
    from l2c.data.shards import read_tar

    samples = []
    for p in list_shards(Path(out) / split):
        for s in read_tar(str(p)):
            samples.append(s)
            if len(samples) == n:
                break
        if len(samples) == n:
            break
    rows = math.ceil(len(samples) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples, strict=False):
        ext = image_member(s)
        meta = json.loads(s["json"])
        ax.imshow(Image.open(io.BytesIO(s[ext])).convert("RGB"), interpolation="nearest")
        ax.set_title(f"{textwrap.fill(s['txt'].decode(), 28)}\n[label: {meta['label']}]", fontsize=7.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
