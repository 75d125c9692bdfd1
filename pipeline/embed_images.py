"""`l2c embed-images`: a resumable Ray Data job that writes a frozen vision tower's features per image.

The image-side twin of `embed-captions` (`embed_job.py`): one Ray Data row per tar, so every stage sees a
whole shard: read + decode + preprocess + encode (tower actors, one per GPU or CPU slot; images decoded by a
small thread pool inside the actor) → write Parquet (tasks; temp name + rename, or one upload to an object
store) → the driver records each finished shard in `manifest.json` (format `l2c-image-cache`, see
`l2c.image_cache`). Same shard names, resume, lock and kill -9 safety as the text cache: a rerun with the same
settings skips finished shards; a crash loses only the shards in flight. Images are decoded and preprocessed
exactly as training does for a frozen tower (`decode_image` at the tower's size, resize + center crop +
normalise), and features come from `trainer/vision/head.py`, so cached and online features are the same.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from l2c.cache import IMAGE_FORMAT_NAME, REJECTED_DIR, CacheError, ShardEntry
from l2c.config import ConfigError
from l2c.errors import L2CError
from l2c.pipeline.embed_job import (
    _lists,
    _reason_counts,
    _row,
    _size,
    assemble_rejects,
    open_manifest,
    open_output,
    shards_to_do,
)
from l2c.pipeline.runner import Runner, Stage, check_runner, encoder_layout
from l2c.storage import Store

# Settings that must match for a rerun to add to an existing image cache.
IDENTITY_KEYS = ("model_fingerprint", "image_spec", "decode_target", "dtype", "store_dtype", "dim", "patch_mean")


def image_identity(settings: dict) -> dict:
    return {k: settings.get(k) for k in IDENTITY_KEYS}


@dataclass
class ImageEmbedConfig:
    """Everything `embed-images` needs; the CLI flags map one to one onto these fields."""

    sources: list[str] = field(default_factory=list)
    out: str = ""
    model: str = (
        ""  # a transformers vision model directory (pretrained, or random weights saved with save_pretrained)
    )
    patch_mean: bool = False  # also store the mean of the last layer's patch tokens
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    store_dtype: str = "float32"
    batch_size: int = 64  # images per tower forward
    decode_threads: int | None = None  # per encoder actor (default: 8 on GPU, 2 on CPU)
    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    ray_address: str | None = None
    runner: str = "auto"  # auto | local | ray (see pipeline/runner.py)
    overwrite: bool = False
    strict: bool = False
    progress: bool = True

    def validate(self) -> None:
        from l2c.cache import STORE_DTYPES
        from l2c.pipeline.encoder import DTYPES

        if not self.model:
            raise ConfigError("embed-images needs --model TOWER_DIR (a transformers vision model directory)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"--store-dtype must be one of {sorted(STORE_DTYPES)}")
        if self.batch_size < 1 or (self.decode_threads is not None and self.decode_threads < 1):
            raise ConfigError("--batch-size and --decode-threads must be positive")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError("--num-actors must be positive")
        check_runner(self.runner, self.ray_address, num_actors=(self.num_actors or 1) > 1)


def load_tower(path: str):
    """(tower in eval mode, image spec) exactly as train-vision builds it from `model.vision.pretrained`."""
    from l2c.trainer.vision.config import VisionConfig
    from l2c.trainer.vision.tower import build_vision_tower

    tower, spec, _ = build_vision_tower(VisionConfig(pretrained=str(path)))
    return tower.eval(), spec


# ---------------------------------------------------------------- stage 1: read, decode, encode
class EncodeImages:
    """Ray Data actor holding the frozen tower: a whole tar in, its features (plus rejects) out."""

    def __init__(self, spec: dict, threads: int | None):
        from concurrent.futures import ThreadPoolExecutor

        import torch
        import transformers

        from l2c.trainer.vision.tower import ImageSpec

        transformers.utils.logging.disable_progress_bar()
        self._threads_before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        self.spec = spec
        self.device = torch.device("cuda" if spec["on_gpu"] and torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, spec["dtype"])
        tower, image_spec = load_tower(spec["model_path"])
        if image_spec.to_dict() != ImageSpec(**spec["image_spec"]).to_dict():
            raise CacheError(f"{spec['model_path']} changed while the job ran (image preprocessing differs)")
        self.tower = tower.to(self.device, self.dtype)
        self.image_spec = image_spec
        self.pool = ThreadPoolExecutor(spec["decode_threads"])

    def close(self) -> None:
        """In-process runs: stop the decode threads, give the process its torch threads back."""
        import torch

        self.pool.shutdown()
        torch.set_num_threads(self._threads_before)

    def _prepare(self, sample):
        """(pixel tensor, None) or (None, (reason, detail)) for one sample."""
        from l2c.data.images import TOO_LARGE, ImageTooLarge, decode_image, image_member
        from l2c.trainer.vision.transforms import eval_transform

        ext = image_member(sample)
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            return None, ("missing_image", f"no image member (has {members})")
        try:
            return eval_transform(
                decode_image(sample[ext], target=self.image_spec.image_size), self.image_spec
            ), None
        except ImageTooLarge as e:  # over the decompression bomb limit: a counted reject of its own
            return None, (TOO_LARGE, str(e)[:200])
        except Exception as e:  # truncated or not an image
            return None, ("corrupt_image", f"{ext} does not decode: {type(e).__name__}: {str(e)[:200]}")

    def _encode(self, pixels: list):
        import torch

        from l2c.trainer.vision.head import tower_outputs

        with torch.inference_mode():
            x = torch.stack(pixels).to(self.device, self.dtype)
            pooled, mean = tower_outputs(self.tower, x, patch_mean=self.spec["patch_mean"])
            return pooled.float().cpu().numpy(), None if mean is None else mean.float().cpu().numpy()

    def _shard(self, source: str) -> dict:
        from l2c.data.shards import read_tar

        tar_rejects: list = []
        keys, pooled, means, rejects = [], [], [], []
        chunk: list = []
        position = 0

        def flush():
            nonlocal position
            pixels, ok_keys = [], []
            for sample, (pix, why) in zip(chunk, self.pool.map(self._prepare, chunk), strict=True):
                if pix is None:
                    rejects.append({"key": sample.key, "reason": why[0], "detail": f"{source}: {why[1]}",
                                    "source": source, "position": position})  # fmt: skip
                else:
                    pixels.append(pix)
                    ok_keys.append(sample.key)
                position += 1
            for start in range(0, len(pixels), self.spec["batch_size"]):
                p, m = self._encode(pixels[start : start + self.spec["batch_size"]])
                pooled.append(p)
                if m is not None:
                    means.append(m)
            keys.extend(ok_keys)
            chunk.clear()

        for sample in read_tar(source, tar_rejects):
            chunk.append(sample)
            if len(chunk) >= self.spec["batch_size"]:
                flush()
        flush()
        rejects += [{**r.as_dict(), "source": source, "position": None} for r in tar_rejects]
        unreadable = any(r.reason == "unreadable_tar" for r in tar_rejects)
        dim = self.spec["dim"]
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)  # noqa: E731
        return {"keys": keys, "pooled": cat(pooled), "mean": cat(means) if self.spec["patch_mean"] else None,
                "rejects": rejects, "n_samples": position, "failed": unreadable and position == 0,
                "partial": unreadable and position > 0}  # fmt: skip

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = []
        for shard, source in zip(batch["shard"].to_pylist(), batch["source"].to_pylist(), strict=True):
            t0 = time.perf_counter()
            r = self._shard(str(source))
            mean = r["mean"] if r["mean"] is not None else np.zeros(0, np.float32)
            parts.append(pa.table({
                "shard": [str(shard)], "source": [str(source)],
                "keys": pa.array([r["keys"]], pa.list_(pa.string())),
                "pooled": _lists(r["pooled"].reshape(-1), pa.float32()), "mean": _lists(mean.reshape(-1), pa.float32()),
                "rejects": [json.dumps(r["rejects"])], "n_samples": pa.array([r["n_samples"]], pa.int64()),
                "failed": [r["failed"]], "partial": [r["partial"]], "encode_s": [time.perf_counter() - t0],
            }))  # fmt: skip
        return pa.concat_tables(parts)


# ---------------------------------------------------------------- stage 2: write
def write_image_shard(
    batch: pa.Table, out_dir: str, store_dtype: str, dim: int, patch_mean: bool, strict: bool
) -> dict:
    """Ray Data task: Parquet (atomic) + the shard's rejects file; returns the manifest entry as JSON."""
    from l2c.cache import write_shard_file
    from l2c.image_cache import build_image_table

    store = Store(out_dir)
    out = {"shard": [], "result": []}
    for i in range(batch.num_rows):
        shard = batch.column("shard")[i].as_py()
        rejects = json.loads(batch.column("rejects")[i].as_py())
        store.makedirs(REJECTED_DIR)
        store.write_text(f"{REJECTED_DIR}/{shard}.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        result = {"status": "done", "rejects": _reason_counts(rejects), "n_samples": batch.column("n_samples")[i].as_py(),
                  "encode_s": batch.column("encode_s")[i].as_py()}  # fmt: skip
        if batch.column("failed")[i].as_py():
            result["status"] = "failed"
            result["detail"] = next(r["detail"] for r in rejects if r["reason"] == "unreadable_tar")
        elif strict and rejects:
            result["status"] = "strict"
            result["detail"] = [r["detail"] for r in rejects[:5]]
        else:
            keys = batch.column("keys")[i].as_py()
            pooled = _row(batch, "pooled", i).reshape(len(keys), dim)
            mean = _row(batch, "mean", i).reshape(len(keys), dim) if patch_mean else None
            rows, digest = write_shard_file(
                store, f"{shard}.parquet", build_image_table(keys, pooled, mean, store_dtype)
            )
            entry = ShardEntry(file=f"{shard}.parquet", source=batch.column("source")[i].as_py(), rows=rows,
                               sha256=digest, n_rejected=len(rejects), partial=bool(batch.column("partial")[i].as_py()))  # fmt: skip
            result["entry"] = asdict(entry)
        out["shard"].append(shard)
        out["result"].append(json.dumps(result))
    return out


# ---------------------------------------------------------------- driver
def resolve_settings(cfg: ImageEmbedConfig, gpus_available: bool) -> dict:
    """The settings recorded in the manifest (every actor works from them)."""
    from pathlib import Path

    from l2c.models import fingerprint
    from l2c.pipeline.encoder import resolve_dtype
    from l2c.teacher import engine_version
    from l2c.trainer.vision.tower import tower_width

    path = Path(cfg.model).expanduser()
    if not (path / "config.json").exists():
        raise L2CError(f"--model {cfg.model}: not a transformers model directory (no config.json)")
    tower, spec = load_tower(str(path))
    return {
        "model": str(cfg.model),
        "model_path": str(path.resolve()),
        "model_fingerprint": fingerprint(path),
        "model_type": tower.config.model_type,
        "model_class": type(tower).__name__,
        "engine_version": engine_version("hf"),  # recorded, not an identity key
        "image_spec": spec.to_dict(),
        "decode_target": spec.image_size,
        "transform": "decode (JPEG draft at the tower's size), resize, center crop, normalise",
        "features": "embedding: pooler output, else the first token; patch_mean: mean of the patch tokens",
        "dtype": str(resolve_dtype(cfg.dtype, "cuda" if gpus_available else "cpu")).replace("torch.", ""),
        "store_dtype": cfg.store_dtype,
        "dim": tower_width(tower),
        "patch_mean": cfg.patch_mean,
    }


def run_embed_images(cfg: ImageEmbedConfig) -> dict:
    """Embed every image of the tars into the image cache at `cfg.out`; returns a summary."""
    from l2c.data.shards import expand_shards
    from l2c.pipeline.sources import shard_names

    cfg.validate()
    if not cfg.out:
        raise ConfigError("embed-images needs --out")
    sources = expand_shards(cfg.sources, what="image shard")
    names = shard_names(sources)
    out, lock = open_output(cfg.out, "embed-images")

    runner = None
    t0 = time.time()
    try:
        def one_cpu_encoder(gpus: float, cpus: float) -> bool:
            lay = layout(cfg, gpus, cpus)
            return not lay["on_gpu"] and lay["n_actors"] == 1

        runner = Runner.start(cfg.runner, cfg.ray_address, one_cpu_encoder)
        lay = layout(cfg, runner.gpus, runner.cpus, runner.local)
        settings = resolve_settings(cfg, lay["on_gpu"])
        manifest = open_manifest(out, settings, cfg.overwrite, image_identity, IMAGE_FORMAT_NAME)
        manifest.save(out)
        todo = shards_to_do(manifest, out, sources, names)
        results = _run_pipeline(cfg, todo, names, settings, runner, lay, manifest, out) if todo else []
        n_rejects = assemble_rejects(out, [names[s] for s in sources])
    finally:
        lock.release()
        if runner is not None:
            runner.stop()
    summary = _summary(cfg, sources, names, manifest, results, len(sources) - len(todo), n_rejects, time.time() - t0)
    return {**summary, "runner": runner.name}


def layout(cfg: ImageEmbedConfig, gpus: float, cpus: float, local: bool = False) -> dict:
    """How the job spreads over `gpus`/`cpus` (`runner.encoder_layout`; an actor on a GPU holds 2 CPUs to decode)."""
    return encoder_layout(gpus, cpus, local, cfg.num_actors, cfg.gpus_per_actor, cfg.cpus_per_actor, 2)


def _run_pipeline(cfg, todo, names, settings, runner: Runner, lay: dict, manifest, out) -> list[dict]:
    from l2c.progress import ProgressBar

    spec = {**settings, "on_gpu": lay["on_gpu"], "batch_size": cfg.batch_size,
            "decode_threads": cfg.decode_threads or (8 if lay["on_gpu"] else 2)}  # fmt: skip
    stages = [
        Stage(EncodeImages, (spec, lay["threads"]), actors=lay["n_actors"],
              num_cpus=min(lay["cpus_per"], max(runner.cpus - 0.25, 0.5)), num_gpus=lay["gpus_per"] if lay["on_gpu"] else 0),
        Stage(write_image_shard, num_cpus=0.25,
              kwargs={"out_dir": out.url, "store_dtype": settings["store_dtype"], "dim": settings["dim"],
                      "patch_mean": settings["patch_mean"], "strict": cfg.strict}),
    ]  # fmt: skip

    sizes = {names[s]: _size(s) for s in todo}
    results, strict_fail = [], None
    with ProgressBar(as_bytes=True, rate=False, enabled=cfg.progress,
                     fields="{shards}/{n_shards} shards  {images_per_s:,.1f} images/s") as bar:  # fmt: skip
        bar.add("embed-images", total=sum(sizes.values()), shards=0, n_shards=len(todo), images_per_s=0)
        for row in runner.run([{"shard": names[s], "source": s} for s in todo], stages):
            res = json.loads(row["result"])
            res["shard"] = row["shard"]
            results.append(res)
            if res["status"] == "done":
                manifest.record(out, row["shard"], ShardEntry(**res["entry"]))
            elif res["status"] == "strict" and strict_fail is None:
                strict_fail = res
            bar.advance(
                sizes[row["shard"]], tally={"shards": 1, "images": res.get("entry", {}).get("rows", 0)}
            )
    manifest.save(out)  # the journal folded into manifest.json
    if strict_fail:
        rejects_file = out.display(f"{REJECTED_DIR}/{strict_fail['shard']}.jsonl")
        raise CacheError(
            f"--strict: shard {strict_fail['shard']} has rejected images, e.g. {strict_fail['detail'][:2]}; "
            f"see {rejects_file}"
        )
    return results


def _summary(cfg, sources, names, manifest, results, skipped, n_rejects, elapsed) -> dict:
    entries = [manifest.shards[names[s]] for s in sources if names[s] in manifest.shards]
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r.get("rejects", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    rows_new = sum(r.get("entry", {}).get("rows", 0) for r in results)
    return {
        "out": str(cfg.out),
        "shards": len(sources),
        "shards_written": sum(r["status"] == "done" for r in results),
        "shards_skipped": skipped,
        "shards_failed": [r["shard"] for r in results if r["status"] == "failed"],
        "shards_partial": [r["shard"] for r in results if r.get("entry", {}).get("partial")],
        "rows": sum(e.rows for e in entries),
        "rows_written": rows_new,
        "rejected": n_rejects,
        "rejected_by_reason_this_run": reasons,
        "seconds": elapsed,
        "images_per_s": rows_new / elapsed if elapsed else 0.0,
        "dim": manifest.settings["dim"],
        "patch_mean": manifest.settings["patch_mean"],
        "model_fingerprint": manifest.settings["model_fingerprint"],
    }
