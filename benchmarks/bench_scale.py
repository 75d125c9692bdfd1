"""Scale: does align-cache and eval-retrieval's cost stay flat as the text cache grows 10x?

Synthetic data in the documented formats, made once under OUT/scale/ (kept for reruns): per step, webdataset
tars of `--keys-per-tar` samples (a 16 px PNG and a caption each) and a text cache of 5 captions a key
(`json:captions[*]`, float16 vectors) grouped as caption tables give it: keys shuffled over shards of
50,000 rows, so no shard belongs to a tar. Every measured row runs in a fresh process (`measure`): its wall
time and its peak RSS (the kernel's high-water mark of that program, VmHWM).

- **align-cache** (`--runner local`: every stage in that one process, so its peak is the worker's) at each step
  (default 30 and 300 tars: 150k and 1.5M vectors) with `--partition-mb`, plus one point at `--wide-dim`
  (4,096-d float16): time per shard written and peak RSS.
- **eval of one tar** against the step's cache (`eval-retrieval`'s streamed text side), and the previous
  in-memory computation (the whole cache loaded as float32 and adapted) beside it.
- **eval at a gallery of 1M captions** (`--gallery`; 5,000 captions a key, so 200 images at the top: the search
  costs images x captions on 2 cores) with a `--embed-dim` 1,280 model, the image features made up: the
  streamed text side and the blocked search, time and memory; and eval's image side on 1 and 10 tars. From
  the two, the cost of one more caption and one more image, extrapolated to 1M images x 5M captions.

Hooks for more rows (train-vision start-up, ...): `dataset()` builds or reuses a step's data, `aligned()` its
aligned cache, `tiny_model()` an exported model for a cache; a function decorated `@step` runs in a fresh
process through `measure(name, **kwargs)`; a function appended to `SECTIONS` (args, data) -> rows adds a table.

    python benchmarks/bench_scale.py [--steps 30,300] [--keys-per-tar 1000] [--dim 256] [--partition-mb 64]
                                     [--wide-dim 4096] [--gallery 100000,1000000] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2c.memory import peak_rss_mb, rss_mb

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = 5
TABLE_ROWS = 50_000
TINY_VIT = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8}  # fmt: skip
STEPS: dict[str, Callable[..., dict]] = {}


def step(fn: Callable[..., dict]) -> Callable[..., dict]:
    """Register `fn` as a measured step: `measure(fn.__name__, **kwargs)` runs it in a fresh process."""
    STEPS[fn.__name__] = fn
    return fn


def measure(name: str, **kwargs) -> dict:
    """Run step `name` in a fresh Python process: {"seconds", "peak_rss_mb", "result"} (wall time of the step
    itself, and the process's peak resident memory, imports included)."""
    proc = subprocess.run([sys.executable, __file__, "--step", name, json.dumps(kwargs, default=str)],
                          stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed (status {proc.returncode})")
    res = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return {"seconds": res.pop("_seconds"), "peak_rss_mb": res.pop("_peak_mb"), "result": res}


def _run_step(name: str, kwargs: str) -> None:
    """In the step's process: the libraries every step uses imported first, so `rss_start_mb` (resident memory
    after them) separates what the step holds from what importing torch and transformers costs."""
    import faiss  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.vit.modeling_vit  # noqa: F401

    start = rss_mb()
    t0 = time.perf_counter()
    res = STEPS[name](**json.loads(kwargs))
    print(json.dumps({**res, "_seconds": time.perf_counter() - t0, "rss_start_mb": start, "_peak_mb": peak_rss_mb()}))


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Dataset:
    """One step's synthetic data: tars, the caption-table cache over them, its settings."""

    root: Path
    tars: list[str]
    cache: Path
    n_keys: int
    dim: int


def settings(dim: int) -> dict:
    from l2c.meta import WHITESPACE, TextCacheSettings
    from l2c.teacher import TeacherSpec

    teacher = TeacherSpec(model="synthetic", model_fingerprint=f"bench-scale-{dim}", dim=dim, store_dtype="float16")
    return TextCacheSettings(teacher, ("json:captions[*]",), "key", WHITESPACE).to_dict()


def table_cache(out: Path, keys: list[str], dim: int, captions: int = CAPTIONS, seed: int = 0) -> Path:
    """A text cache of `captions` rows a key (`json:captions[i]`), keys shuffled over shards of TABLE_ROWS rows."""
    from l2c.cache import Manifest, ShardEntry, build_table, write_shard_file

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    per = max(1, TABLE_ROWS // captions)
    shards = {}
    for s, start in enumerate(range(0, len(keys), per)):
        ks = [keys[i] for i in order[start : start + per] for _ in range(captions)]
        fs = [f"json:captions[{c}]" for _ in range(len(ks) // captions) for c in range(captions)]
        vecs = rng.standard_normal((len(ks), dim), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        table = build_table(ks, fs, vecs, np.full(len(ks), 40), np.zeros(len(ks), bool), "float16")
        rows, sha = write_shard_file(out, f"captions-{s:05d}.parquet", table)
        shards[f"captions-{s:05d}"] = ShardEntry(f"captions-{s:05d}.parquet", f"captions-{s:05d}.jsonl", rows, sha)
    Manifest(settings=settings(dim), shards=shards).save(out)
    return out


def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dataset(root: Path, n_tars: int, keys_per_tar: int, dim: int) -> Dataset:
    """Tars `root/tars/part-NNNNN.tar` and the caption-table cache `root/captions`; reused when already made."""
    import shutil

    import webdataset as wds

    stamp = {"tars": n_tars, "keys_per_tar": keys_per_tar, "dim": dim, "captions": CAPTIONS, "version": 1}
    tars = [str(root / "tars" / f"part-{t:05d}.tar") for t in range(n_tars)]
    made = root / "made.json"
    if not (made.exists() and json.loads(made.read_text()) == stamp):
        shutil.rmtree(root, ignore_errors=True)
        (root / "tars").mkdir(parents=True)
        image = png()
        for t, url in enumerate(tars):
            with wds.TarWriter(url) as w:
                for i in range(keys_per_tar):
                    w.write({"__key__": f"{t:05d}-{i:05d}", "png": image, "txt": b"a synthetic picture"})
        keys = [f"{t:05d}-{i:05d}" for t in range(n_tars) for i in range(keys_per_tar)]
        table_cache(root / "captions", keys, dim)
        made.write_text(json.dumps(stamp))
    return Dataset(root, tars, root / "captions", n_tars * keys_per_tar, dim)


def aligned(ds: Dataset, partition_mb: float) -> Path:
    """The step's aligned cache (made by `align-cache` in this process when missing)."""
    from l2c.cache import TextCache

    out = ds.root / "aligned"
    if not (out / "manifest.json").exists() or len(TextCache(out).shard_names) != len(ds.tars):
        measure("align", text_cache=str(ds.cache), images=ds.tars, out=str(out), partition_mb=partition_mb)
    return out


def tiny_model(out: Path, dim: int, embed_dim: int = 32) -> Path:
    """An exported model (random tiny ViT + adapter) for caches of `settings(dim)`; reused when there."""
    if (out / "export").exists():
        return out
    import torch

    from l2c.teacher import TeacherSpec
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.export import export_model
    from l2c.trainer.vision.model import L2CModel
    from l2c.trainer.vision.tower import build_vision_tower

    torch.manual_seed(0)
    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_VIT)))
    model = L2CModel(tower, spec, text_dim=dim, embed_dim=embed_dim, n_blocks=1, expansion=2).eval()
    export_model(model, out / "export", proc, TeacherSpec.from_dict(settings(dim)), ["json:captions[*]"])
    return out


# ---------------------------------------------------------------------------------------------- steps
@step
def align(text_cache: str, images: list[str], out: str, partition_mb: float) -> dict:
    import shutil

    from l2c.pipeline.align import AlignConfig, run_align

    shutil.rmtree(out, ignore_errors=True)
    return run_align(AlignConfig(text_cache, images, out, partition_mb, runner="local", progress=False))


@step
def eval_one_tar(model: str, tar: str, text_cache: str) -> dict:
    from l2c.eval.retrieval import run_retrieval

    r = run_retrieval(model, [tar], text_cache, [1, 5], backend="faiss")
    return {"n_images": r["n_images"], "n_texts": r["n_texts"], "other_rows": r["cache_rows_not_evaluated"],
            "recall": {"i2t": r["image_to_text"], "t2i": r["text_to_image"]}}  # fmt: skip


@step
def eval_one_tar_in_memory(model: str, tar: str, text_cache: str) -> dict:
    """The previous text side: the whole cache loaded as float32 and adapted, then the same search."""
    from l2c.cache import TextCache
    from l2c.eval.features import extract_image_features
    from l2c.eval.model import adapt_texts, load_model
    from l2c.eval.retrieval import evaluate_retrieval

    net = load_model(model)
    img = extract_image_features(net, [tar])
    keys, fields, vecs = TextCache(text_cache).load()
    r = evaluate_retrieval(img.keys, img.features, keys, fields, adapt_texts(net, vecs), [1, 5], "faiss",
                           allow_missing=True)  # fmt: skip
    return {"n_images": r["n_images"], "n_texts": r["n_texts"],
            "recall": {"i2t": r["image_to_text"], "t2i": r["text_to_image"]}}  # fmt: skip


@step
def eval_gallery(model: str, text_cache: str, n_images: int) -> dict:
    """The streamed text side and the blocked search for `n_images` images (features made up) against all their
    captions: resident memory above the start after each part."""
    from l2c.cache import TextCache
    from l2c.eval import search
    from l2c.eval.model import load_model
    from l2c.eval.retrieval import caption_gallery, evaluate_gallery

    net = load_model(model)
    cache = TextCache(text_cache)
    keys = [f"g{i:07d}" for i in range(n_images)]  # as `gallery_rows` names them
    rng = np.random.default_rng(0)
    image_feats = search.l2_normalize(rng.standard_normal((len(keys), net.meta.embed_dim), dtype=np.float32))
    t0 = time.perf_counter()
    texts = caption_gallery(cache, keys, None, net, "float16")  # what `auto` keeps above 1 GiB
    t_text, rss_text, peak_text = time.perf_counter() - t0, rss_mb(), peak_rss_mb()
    t0 = time.perf_counter()
    r = evaluate_gallery(keys, image_feats, texts, [1, 5], "faiss")
    return {"n_images": len(keys), "n_texts": r["n_texts"], "embed_dim": int(net.meta.embed_dim),
            "text_seconds": t_text, "search_seconds": time.perf_counter() - t0, "rss_after_text_mb": rss_text,
            "peak_after_text_mb": peak_text, "gallery_mb": texts.feats.nbytes / 2**20}  # fmt: skip


@step
def image_features(model: str, tars: list[str]) -> dict:
    """eval's image side (`extract_image_features`): resident memory it keeps and its peak."""
    from l2c.eval.features import extract_image_features
    from l2c.eval.model import load_model

    net = load_model(model)
    t0 = time.perf_counter()
    img = extract_image_features(net, tars)
    return {"n_images": len(img.keys), "embed_dim": int(net.meta.embed_dim), "seconds": time.perf_counter() - t0,
            "rss_kept_mb": rss_mb(), "features_mb": img.features.nbytes / 2**20}  # fmt: skip


# ---------------------------------------------------------------------------------------------- sections
def align_rows(args, data: dict[str, Dataset]) -> list[dict]:
    rows = []
    for label, ds in data.items():
        m = measure("align", text_cache=str(ds.cache), images=ds.tars, out=str(ds.root / "aligned"),
                    partition_mb=args.partition_mb)  # fmt: skip
        r = m["result"]
        rows.append({"section": "align-cache", "data": label, "tars": len(ds.tars), "vectors": ds.n_keys * CAPTIONS,
                     "dim": ds.dim, "seconds": round(m["seconds"], 2),
                     "seconds_per_shard": round(m["seconds"] / max(1, r["shards_written"]), 4),
                     "peak_rss_mb": round(m["peak_rss_mb"]), "above_start_mb": round(m["peak_rss_mb"] - r["rss_start_mb"]),
                     "partitions": r["partitions"],
                     "stage_peak_rss_mb": {k: round(v) for k, v in r["peak_rss_mb"].items()},
                     "rejected": r["rejected"]})  # fmt: skip
    return rows


def eval_rows(args, data: dict[str, Dataset]) -> list[dict]:
    """One tar evaluated against the step's aligned cache (its captions in one shard), against the caption-table
    cache (its 1,000 keys scattered over every shard, so every shard's vectors are decoded), and by the previous
    in-memory path against the table cache."""
    rows = []
    for label, ds in data.items():
        model = tiny_model(args.work / f"model-{ds.dim}", ds.dim)
        runs = [("eval_one_tar", "streamed, aligned cache", aligned(ds, args.partition_mb)),
                ("eval_one_tar", "streamed, caption tables", ds.cache)]
        runs += [("eval_one_tar_in_memory", "in memory (previous), caption tables", ds.cache)] * args.in_memory
        for how, text_side, cache in runs:
            m = measure(how, model=str(model), tar=ds.tars[0], text_cache=str(cache))
            rows.append({"section": "eval one tar", "data": label, "text side": text_side,
                         "cache_vectors": ds.n_keys * CAPTIONS, "dim": ds.dim, "n_texts": m["result"]["n_texts"],
                         "seconds": round(m["seconds"], 2), "peak_rss_mb": round(m["peak_rss_mb"]),
                         "above_start_mb": round(m["peak_rss_mb"] - m["result"]["rss_start_mb"])})  # fmt: skip
    return rows


def gallery_rows(args, data: dict[str, Dataset]) -> list[dict]:
    """A caption gallery of each `--gallery` size at embed_dim `--embed-dim` (1,280: LLM2CLIP's ViT-L/14), 5,000
    captions a key so that the search (images x captions, here on 2 CPU cores) stays short; and the image side on
    1 and 10 tars. The cost of one more caption and of one more image, for docs/scale.md's extrapolation."""
    rows = []
    model = tiny_model(args.work / f"model-{args.dim}-{args.embed_dim}", args.dim, args.embed_dim)
    per = 5000
    for n in args.gallery:
        d = args.work / f"gallery-{n}-{per}"
        if not (d / "manifest.json").exists():
            table_cache(d, [f"g{i:07d}" for i in range(n // per)], args.dim, captions=per)
        m = measure("eval_gallery", model=str(model), text_cache=str(d), n_images=n // per)
        r = m["result"]
        rows.append({"section": "eval gallery", "captions": r["n_texts"], "images": r["n_images"], "dim": args.dim,
                     "embed_dim": r["embed_dim"], "seconds": round(m["seconds"], 1),
                     "text_seconds": round(r["text_seconds"], 1), "search_seconds": round(r["search_seconds"], 1),
                     "gallery_mb": round(r["gallery_mb"]), "text_kept_mb": round(r["rss_after_text_mb"] - r["rss_start_mb"]),
                     "text_peak_mb": round(r["peak_after_text_mb"] - r["rss_start_mb"]),
                     "peak_above_start_mb": round(m["peak_rss_mb"] - r["rss_start_mb"]),
                     "peak_rss_mb": round(m["peak_rss_mb"])})  # fmt: skip
    first = next(iter(data.values()))
    for n in (1, 10):
        m = measure("image_features", model=str(model), tars=first.tars[:n])
        r = m["result"]
        rows.append({"section": "eval image side", "images": r["n_images"], "embed_dim": r["embed_dim"],
                     "seconds": round(m["seconds"], 1), "features_mb": round(r["features_mb"], 1),
                     "kept_mb": round(r["rss_kept_mb"] - r["rss_start_mb"]),
                     "peak_above_start_mb": round(m["peak_rss_mb"] - r["rss_start_mb"])})  # fmt: skip
    return rows


def extrapolate(rows: list[dict], images: int = 1_000_000, captions: int = 5_000_000) -> dict:
    """Peak host RAM of eval at `images` x `captions` from the measured rows: what stays (image features, caption
    gallery) grows per image and per caption as measured between the two sizes; the peak adds the largest
    transient measured on top of what stays (the search's blocks, the image side's copies)."""
    gal = [r for r in rows if r["section"] == "eval gallery"]
    img = [r for r in rows if r["section"] == "eval image side"]
    if len(gal) < 2 or len(img) < 2:
        return {}
    per_caption = (gal[-1]["text_kept_mb"] - gal[0]["text_kept_mb"]) * 2**20 / (gal[-1]["captions"] - gal[0]["captions"])
    per_image = (img[-1]["kept_mb"] - img[0]["kept_mb"]) * 2**20 / (img[-1]["images"] - img[0]["images"])
    image_peak_per_image = (img[-1]["peak_above_start_mb"] - img[0]["peak_above_start_mb"]) * 2**20 / (
        img[-1]["images"] - img[0]["images"])  # fmt: skip
    search_transient = gal[-1]["peak_above_start_mb"] - gal[-1]["text_kept_mb"]
    kept = (per_caption * captions + per_image * images) / 2**30
    image_phase = image_peak_per_image * images / 2**30
    peak = max(image_phase, kept + search_transient / 1024)
    return {"images": images, "captions": captions, "embed_dim": gal[-1]["embed_dim"],
            "bytes_per_caption": round(per_caption), "bytes_per_image": round(per_image),
            "image_side_peak_bytes_per_image": round(image_peak_per_image), "search_transient_mb": search_transient,
            "kept_gb": round(kept, 1), "image_phase_peak_gb": round(image_phase, 1),
            "peak_gb_above_start": round(peak, 1), "start_mb": gal[-1]["peak_rss_mb"] - gal[-1]["peak_above_start_mb"]}  # fmt: skip


SECTIONS: list[Callable] = [align_rows, eval_rows, gallery_rows]


def ratio(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows]
    return round(vals[-1] / vals[0], 2) if len(vals) >= 2 and vals[0] else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="30,300", help="tars per step, comma-separated (10x apart)")
    ap.add_argument("--keys-per-tar", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--wide-dim", type=int, default=4096, help="the one wide point (0: none): 30 tars of 200 keys")
    ap.add_argument("--partition-mb", type=float, default=64)
    ap.add_argument("--gallery", default="100000,1000000", help="caption gallery sizes for eval, comma-separated")
    ap.add_argument("--embed-dim", type=int, default=1280, help="the eval model's embedding width for the gallery rows")
    ap.add_argument("--no-in-memory", dest="in_memory", action="store_false", help="skip the previous eval path")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = ap.parse_args(argv)
    args.work = args.out / "scale"
    args.gallery = [int(g) for g in args.gallery.split(",") if g]
    from rich.console import Console
    from rich.table import Table

    from l2c import atomic

    console = Console()
    data = {f"{n} tars": dataset(args.work / f"step-{n}", n, args.keys_per_tar, args.dim)
            for n in (int(s) for s in args.steps.split(","))}  # fmt: skip
    if args.wide_dim:
        data[f"30 tars, {args.wide_dim}-d"] = dataset(args.work / f"wide-{args.wide_dim}", 30, 200, args.wide_dim)
    rows = []
    for section in SECTIONS:
        console.print(f"[bold]{section.__name__}[/bold] …")
        rows += section(args, data)
    steps = [r for r in rows if r["section"] == "align-cache" and r["dim"] == args.dim]
    flat = {"align seconds per shard": ratio(steps, "seconds_per_shard"), "align peak RSS": ratio(steps, "peak_rss_mb"),
            "align peak RSS above start": ratio(steps, "above_start_mb")}  # fmt: skip
    for side in ("streamed, aligned cache", "streamed, caption tables", "in memory (previous), caption tables"):
        part = [r for r in rows if r["section"] == "eval one tar" and r["text side"] == side and r["dim"] == args.dim]
        flat[f"eval one tar ({side}) seconds"] = ratio(part, "seconds")
        flat[f"eval one tar ({side}) peak RSS above start"] = ratio(part, "above_start_mb")
    for section in sorted({r["section"] for r in rows}, key=[r["section"] for r in rows].index):
        part = [r for r in rows if r["section"] == section]
        cols = [c for c in part[0] if c != "section" and not isinstance(part[0][c], dict)]
        t = Table(title=section)
        for c in cols:
            t.add_column(c, justify="right")
        for r in part:
            t.add_row(*(f"{r.get(c):,}" if isinstance(r.get(c), (int, float)) else str(r.get(c, "")) for c in cols))
        console.print(t)
    console.print("10x data, ratio of the larger to the smaller (flat: <= 1.5): " + ", ".join(f"{k} {v}x" for k, v in flat.items()))
    extra = extrapolate(rows)
    if extra:
        console.print(f"eval at {extra['images']:,} images x {extra['captions']:,} captions, {extra['embed_dim']}-d: "
                      f"{extra['bytes_per_caption']:,} B a caption, {extra['bytes_per_image']:,} B an image kept; peak "
                      f"~{extra['peak_gb_above_start']} GB above the process's start ({extra['start_mb']:,} MB)")  # fmt: skip
    result = {"benchmark": "scale: align-cache and eval against 10x caches",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", "args": {k: str(v) for k, v in vars(args).items()},
              "ratios_10x": flat, "eval_extrapolated": extra, "rows": rows}  # fmt: skip
    path = args.out / "bench_scale.json"
    atomic.write_json(path, result)
    console.print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--step":
        _run_step(sys.argv[2], sys.argv[3])
    else:
        main()
