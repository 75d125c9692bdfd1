"""`make demo-photos`: learning from real photos — Flickr8k, 6,000 train photos, 1,000 held-out dev photos.

    python -m l2c.apps.demo_photos --out demo-photos-out [--data ../shared/data] [overrides...]

Stages, each skipped when its output is already complete (a rerun resumes where the last one stopped):

    1 make-shards     OUT/data/{train,dev}: webdataset tars of the photos and their five captions
    2 embed-captions  OUT/cache/{train,dev}: MiniLM vectors of all five captions (`json:captions[*]`)
    3 train-vision    OUT/run: a small vision model from random weights (configs/flickr8k_cpu.yaml)
    4 eval-retrieval  OUT/eval/retrieval: R@1/5/10 both ways on the 1,000 dev photos against all 5,000 captions
    5 train-vision    OUT/control: the same model trained on shuffled pairs (`data.shuffle_pairs=true`)
    6 eval-retrieval  OUT/eval/control: the control's figures, which should sit at chance

`OUT/eval.json` has the same schema as `make demo`'s (plus `control`); `OUT/report.md` lists the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from l2c import atomic
from l2c.apps.demo import cli, console, eval_json, print_results, run_stages, train_vision, write_report
from l2c.errors import L2CError

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout
SPLITS = {"train": "flickr8k_train_photos", "dev": "flickr8k_dev_photos"}
FIELD = "json:captions[*]"


@dataclass
class PhotoDemoSettings:
    out: Path
    data: Path = DEFAULT_DATA
    config: str = "flickr8k_cpu"
    train_overrides: list[str] = field(default_factory=list)
    control: bool = True
    control_steps: int | None = 600  # None or 0: the config's steps
    max_minutes: float | None = None
    progress: bool = True

    def photos(self, split: str) -> Path:
        return self.data / SPLITS[split]

    def shards_dir(self, split: str) -> Path:
        return self.out / "data" / split

    def cache(self, split: str) -> Path:
        return self.out / "cache" / split

    def run_dir(self, kind: str) -> Path:
        return self.out / ("run" if kind == "run" else "control")

    def eval_dir(self, kind: str) -> Path:
        return self.out / "eval" / kind


def shards(s: PhotoDemoSettings, split: str) -> list[str]:
    info = json.loads((s.shards_dir(split) / "info.json").read_text())
    return [str(s.shards_dir(split) / p) for p in info["shards"]]


def _progress(s: PhotoDemoSettings) -> list[str]:
    return [] if s.progress else ["--no-progress"]


def shards_done(s: PhotoDemoSettings) -> bool:
    for split in SPLITS:
        p = s.shards_dir(split) / "info.json"
        if not p.exists():
            return False
        info = json.loads(p.read_text())
        if info.get("written", 0) + info.get("rejected", 0) < info.get("records", 1):
            return False
    return True


def run_shards(s: PhotoDemoSettings) -> None:
    for split in SPLITS:
        src = s.photos(split)
        if not (src / "captions.jsonl").exists():
            raise L2CError(f"{src}/captions.jsonl not found: pass --data DIR holding {', '.join(SPLITS.values())}")
        cli(["make-shards", str(src), "--captions", str(src / "captions.jsonl"), "--image-field", "file_name",
             "--key-field", "image_id", "--out", str(s.shards_dir(split)), "--shard-size", "1000"])


def embed_done(s: PhotoDemoSettings) -> bool:
    from l2c.cache import CacheError, TextCache

    try:
        return all(all(TextCache(s.cache(split)).shard_for_source(src) is not None for src in shards(s, split))
                   for split in SPLITS)
    except (CacheError, FileNotFoundError):
        return False


def run_embed(s: PhotoDemoSettings) -> None:
    for split in SPLITS:
        cli(["embed-captions", *shards(s, split), "--out", str(s.cache(split)), "--model", "minilm",
             "--text-field", FIELD, *_progress(s)])


def summary(s: PhotoDemoSettings, kind: str) -> dict | None:
    p = s.run_dir(kind) / "summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def train_done(s: PhotoDemoSettings, kind: str) -> bool:
    done = summary(s, kind)
    return bool(done and done.get("finished") and (s.run_dir(kind) / "export").exists())


def run_train(s: PhotoDemoSettings, kind: str) -> None:
    extra = []
    if kind == "control":
        extra = ["data.shuffle_pairs=true"] + ([f"steps={s.control_steps}"] if s.control_steps else [])
    train_vision(s.run_dir(kind), shards(s, "train"), s.cache("train"), s.config, s.max_minutes, s.progress,
                 [*s.train_overrides, *extra])


def eval_fresh(s: PhotoDemoSettings, kind: str, model: str) -> bool:
    p, m = s.eval_dir(kind) / "eval.json", s.run_dir(model) / "summary.json"
    return p.exists() and m.exists() and p.stat().st_mtime >= m.stat().st_mtime


def run_eval(s: PhotoDemoSettings, kind: str, model: str) -> None:
    images = [a for p in shards(s, "dev") for a in ("--images", p)]
    cli(["eval-retrieval", "--model", str(s.run_dir(model)), *images, "--text-cache", str(s.cache("dev")),
         "--out", str(s.eval_dir(kind))])


def stages(s: PhotoDemoSettings) -> tuple:
    out = (
        ("shards", "make-shards", shards_done, run_shards, ()),
        ("embed", "embed-captions", embed_done, run_embed, ("shards",)),
        ("train", "train-vision", lambda s: train_done(s, "run"), lambda s: run_train(s, "run"), ("embed",)),
        ("retrieval", "eval-retrieval", lambda s: eval_fresh(s, "retrieval", "run"),
         lambda s: run_eval(s, "retrieval", "run"), ("train",)),
    )
    if s.control:
        out += (
            ("control", "train-vision", lambda s: train_done(s, "control"), lambda s: run_train(s, "control"),
             ("embed",)),
            ("control_eval", "eval-retrieval", lambda s: eval_fresh(s, "control", "control"),
             lambda s: run_eval(s, "control", "control"), ("control",)),
        )
    return out


def summarize(s: PhotoDemoSettings, status: dict, seconds: float) -> dict:
    def ok(name: str) -> bool:
        return name in status and status[name]["status"] in ("done", "skipped")

    retrieval = eval_json(s, "retrieval") if ok("retrieval") else None
    n_images = (retrieval or {}).get("n_images")
    # top-1 at random: an image's caption is one of n_texts, n_images of them its own (5 of 5,000 here);
    # a caption's image is one of n_images
    chance = {"image_to_text_R@1": round(100 / n_images, 4), "text_to_image_R@1": round(100 / n_images, 4)} \
        if n_images else {}
    return {
        "ok": all(v["status"] in ("done", "skipped") for v in status.values()),
        "settings": {"data": str(s.data), "config": s.config, "train_overrides": s.train_overrides,
                     "fields": [FIELD], "control": s.control, "control_steps": s.control_steps},
        "stages": status,
        "seconds": round(seconds, 1),
        "train": summary(s, "run") if ok("train") else None,
        "retrieval": retrieval,
        "zeroshot": None,
        "control": eval_json(s, "control") if ok("control_eval") else None,
        "chance": chance,
    }


def run_photo_demo(s: PhotoDemoSettings) -> dict:
    """Run (or resume) every stage; returns the content of `OUT/eval.json`."""
    status, seconds = run_stages(stages(s), s)
    result = summarize(s, status, seconds)
    atomic.write_json(s.out / "eval.json", result)
    write_report(s, result, title="l2c photo demo report (Flickr8k)")
    print_results(result, title="l2c photo demo (Flickr8k)", per_field=False)  # five fields: the overall rows
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m l2c.apps.demo_photos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("demo-photos-out"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"directory holding {' and '.join(SPLITS.values())} (default ../shared/data)")
    ap.add_argument("--config", default="flickr8k_cpu", help="train-vision config (default configs/flickr8k_cpu.yaml)")
    ap.add_argument("--no-control", action="store_true", help="skip the shuffled-pairs control run")
    ap.add_argument("--control-steps", type=int, default=600, help="steps of the control run (0: the config's)")
    ap.add_argument("--max-minutes", type=float, default=None, help="cap on each training stage (resumable)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="train-vision config overrides, e.g. steps=50 batch_size=32")
    a = ap.parse_args(argv)
    s = PhotoDemoSettings(out=a.out, data=a.data, config=a.config, train_overrides=a.overrides,
                          control=not a.no_control, control_steps=a.control_steps, max_minutes=a.max_minutes,
                          progress=not a.no_progress)
    console.print(f"photos from {s.data}")
    result = run_photo_demo(s)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
