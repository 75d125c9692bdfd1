"""The training loop behind `l2c train-vision`: one process, or one rank of a DDP job (Ray Train, torchrun).

`train(job)` reads as four steps: `setup` (cache, model, optimiser), `resume` (a checkpoint's state),
`train_step` (one optimiser step), `finish` (skip report, curves, export, summary).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from l2c import atomic
from l2c.cache import CacheError, TextCache
from l2c.config import dump_config, to_dict
from l2c.data.shards import expand_shards
from l2c.errors import JobFailed, L2CError
from l2c.progress import ProgressBar
from l2c.storage import RunDir, Store
from l2c.teacher import TeacherSpec
from l2c.trainer import distributed as D
from l2c.trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from l2c.trainer.job import TrainJob
from l2c.trainer.plots import plot_metrics
from l2c.trainer.resume import ResumeError, check_changes
from l2c.trainer.runlog import RunLog
from l2c.trainer.schedule import make_scheduler
from l2c.trainer.vision import join_index
from l2c.trainer.vision.config import TrainConfig
from l2c.trainer.vision.data import SKIP_KINDS, StreamSpec
from l2c.trainer.vision.export import export_model
from l2c.trainer.vision.loader import make_loader
from l2c.trainer.vision.loss import make_loss, nested_dims
from l2c.trainer.vision.model import L2CModel
from l2c.trainer.vision.optim import make_optimizer
from l2c.trainer.vision.pairing import plan_tars, used_fields
from l2c.trainer.vision.tower import build_vision_tower, freeze_first_blocks

MAX_EXAMPLES = 20
log = logging.getLogger(__name__)


# Settings a resume may change (applied from the checkpoint's step on); any other change is refused.
RESUME_SAFE = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "torch_threads", "data.prefetch_factor",
               "data.join_max_rows")  # fmt: skip
# What train-vision writes into its run directory (`--overwrite` removes these, nothing else).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "curves.png", "data_skips.json", "summary.json", "export",
               "pairing-index", "config.yaml")  # fmt: skip
RUN_NAMES = (*RUN_OUTPUTS, ".l2c-lock.json")  # all that train-vision writes in its --out


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "curves.png"

    @property
    def skips(self) -> Path:
        return self.root / "data_skips.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def export(self) -> Path:
        return self.root / "export"


def build_model(cfg: TrainConfig, text_dim: int) -> tuple[L2CModel, object]:
    tower, spec, processor = build_vision_tower(cfg.model.vision)
    model = L2CModel(
        tower,
        spec,
        text_dim=text_dim,
        embed_dim=cfg.model.embed_dim,
        n_blocks=cfg.model.adapter.n_blocks,
        expansion=cfg.model.adapter.expansion,
        logit_scale_init=cfg.model.logit_scale_init,
        logit_scale_max=cfg.model.logit_scale_max,
        logit_bias_init=cfg.loss.siglip_bias_init if cfg.loss.kind == "siglip" else None,
        frozen=cfg.model.vision.frozen,
        feature=cfg.model.vision.feature,
        head_layers=cfg.model.vision.head_layers,
        head_hidden=cfg.model.vision.head_hidden,
        nested_dims=nested_dims(cfg.model.nested_dims, cfg.model.embed_dim),
    )
    if cfg.model.init:  # a released LLM2CLIP checkpoint: its weights before any freezing
        from l2c.trainer.vision.released import init_from_released

        init_from_released(model, cfg.model.init, text_dim)
    freeze_first_blocks(model.tower, cfg.model.vision.freeze_blocks)
    return model, processor


def shuffle_seed(cfg: TrainConfig) -> int | None:
    """The shuffled-pairs control's seed (`data.shuffle_pairs`), or None for true pairs."""
    return cfg.seed if cfg.data.shuffle_pairs else None


def check_cache(cfg: TrainConfig, cache: TextCache) -> None:
    if cfg.model.text_dim and cfg.model.text_dim != cache.dim:
        raise CacheError(
            f"text cache {cache.dir} holds {cache.dim}-dim vectors but model.text_dim={cfg.model.text_dim}: "
            "the cache was made with another text encoder; re-embed, or set model.text_dim to match"
        )
    if not cache.manifest.shards:
        raise CacheError(f"text cache {cache.dir} has no finished shards")
    try:  # each rank reads the footers of its share of the shards; every rank stops on any rank's finding
        cache.check_dims(part=(D.rank(), D.world_size()))
        found = None
    except CacheError as e:
        found = str(e)
    found = next((f for f in D.all_gather_object(found) if f), None)
    if found:
        raise CacheError(found)
    if cfg.model.init:  # a released-layout model exported from an l2c run records the teacher it learned from
        from l2c.trainer.vision.released import recorded_meta

        meta = recorded_meta(cfg.model.init)
        if meta is not None and meta.teacher is not None:
            meta.teacher.check_same(cache.teacher, f"model.init={cfg.model.init}", "the cache", f"text cache {cache.dir}",
                                    "train on vectors of the teacher the initial model learned from")  # fmt: skip


def _digest(prev: str, keys: list[str]) -> str:
    return hashlib.sha256((prev + "\n" + "\n".join(keys)).encode()).hexdigest()


def _merge_examples(into: dict[str, list[str]], new: dict[str, list[str]]) -> None:
    for k, v in new.items():
        lst = into.setdefault(k, [])
        lst.extend(v[: max(0, MAX_EXAMPLES - len(lst))])


@dataclass
class Run:
    """One rank's training state: what a checkpoint saves and `finish` reports."""

    job: TrainJob
    rank: int
    world: int
    device: torch.device
    run: RunDir
    paths: RunPaths
    cache: TextCache
    fields: list[str]
    model: L2CModel
    net: nn.Module  # the model, in DDP when there are several ranks
    processor: object
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    log: RunLog
    loss_fn: Callable
    step: int = 0
    samples_seen: int = 0
    digest: str = ""
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    stats: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    resumed_from: int | None = None
    image_cache: object = None  # l2c.image_cache.ImageCache with `--image-cache`

    @property
    def cfg(self) -> TrainConfig:
        return self.job.cfg

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(job: TrainJob, device: str | torch.device | None = None) -> tuple[Run, dict | None]:
    """Join the process group, open the run directory and the cache, build model and optimiser.

    Returns the run and the checkpoint to resume from (None for a fresh run); refuses a run directory that
    holds checkpoints without `job.resume`, and a checkpoint made with another cache, model or world.
    """
    cfg = job.cfg
    D.maybe_init_torchrun()
    rank, world = D.rank(), D.world_size()
    device = D.pick_device(device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    run = RunDir(job.out, tag=f"rank{rank}")  # an object-store --out: a local staging copy, synced at checkpoints
    if job.overwrite and rank == 0:
        _remove_outputs(run)
    D.barrier()
    run.pull()
    paths = RunPaths(run.local)

    cache = TextCache(job.text_cache)
    check_cache(cfg, cache)
    fields = used_fields(cache, cfg.data.caption_weights)
    ckpt = _checkpoint_to_resume(job, paths, cache, world)

    torch.manual_seed(cfg.seed + rank)
    model, processor = build_model(cfg, cache.dim)
    model.to(device)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.steps, cfg.optim.warmup_steps, "cosine", cfg.optim.min_lr_ratio)
    r = Run(job, rank, world, device, run, paths, cache, fields, model, D.wrap_ddp(model, device), processor,
            opt, sched, RunLog(paths.metrics, rank == 0),
            make_loss(cfg.loss.kind, cfg.loss.gather_with_grad, model.nested_dims))  # fmt: skip
    return r, ckpt


def _remove_outputs(run: RunDir) -> None:
    """`--overwrite`: what an earlier train-vision wrote into the run directory, and nothing else."""
    import shutil

    if run.remote:
        raise ResumeError(f"--overwrite: {run.display()} is in an object store; use a new --out there")
    for name in RUN_OUTPUTS:
        p = run.local / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _checkpoint_to_resume(job: TrainJob, paths: RunPaths, cache: TextCache, world: int) -> dict | None:
    cfg = job.cfg
    ckpt_path = latest_checkpoint(paths.root)
    if ckpt_path is None:
        if job.resume:
            raise ResumeError(f"--resume: {paths.root} holds no checkpoint to resume from")
        return None
    if job.resume is False:
        raise ResumeError(f"{paths.root} holds checkpoints (last: {ckpt_path.name}); leave out --no-resume to "
                          "continue the run, pass --overwrite to start it afresh, or pick a new --out")  # fmt: skip
    ckpt = load_checkpoint(ckpt_path)
    if "teacher" in ckpt:
        TeacherSpec.from_dict(ckpt["teacher"]).check_same(
            cache.teacher, "the run", "the cache", f"text cache {cache.dir}",
            "resume with the cache the run was trained on, or start a new run")  # fmt: skip
    elif ckpt["cache_fingerprint"] != cache.fingerprint:  # a checkpoint from before teachers were recorded
        raise CacheError(
            f"text cache fingerprint {cache.fingerprint[:16]}… differs from the one this run was trained on "
            f"({ckpt['cache_fingerprint'][:16]}…): the vectors come from another encoder or settings; "
            "resume with the original cache, or start a new run"
        )
    changed = check_changes(ckpt["config"], to_dict(cfg), RESUME_SAFE, f"run {paths.root}", to_dict(TrainConfig()))
    if changed:
        log.info("resuming %s with %s", paths.root, "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    if (ckpt["world_size"], ckpt["num_workers"]) != (world, cfg.data.workers):
        raise ResumeError(
            f"the run was trained with {ckpt['world_size']} rank(s) x {ckpt['num_workers']} data workers; "
            f"resuming with {world} x {cfg.data.workers} would change the data order. Use the same values"
        )
    return ckpt


def resume(r: Run, ckpt: dict | None) -> None:
    """Load a checkpoint's weights, optimiser, schedule, RNG and data positions into `r`."""
    if ckpt is None:
        return
    r.model.load_state_dict(ckpt["weights"])
    r.opt.load_state_dict(ckpt["optimizer"])
    r.sched.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"][r.rank])
    mine = ckpt["data"][r.rank]
    r.positions = {int(k): tuple(v) for k, v in mine["positions"].items()}
    r.stats = Counter(mine["stats"])
    r.examples = mine["examples"]
    r.step, r.samples_seen, r.digest = ckpt["step"], ckpt["samples_seen"], mine["digest"]
    r.resumed_from = r.step
    log.info("resumed %s at step %d (%d samples seen)", r.paths.root, r.step, r.samples_seen)


def make_stream(r: Run, shards: list[str]):
    """Plan the pairing on every rank (O(tars + shards), see pairing.py), build the join index when some tar needs
    it (once: see join_index.py), then this rank's data loader."""
    cfg = r.cfg
    plan = plan_tars(r.cache, shards, cfg.data.pairing, cfg.data.join_max_rows, r.job.images)
    t0 = time.perf_counter()
    index, built = join_index.prepare(r.cache, r.run, r.main) if plan.join else (None, False)
    if r.main:
        r.paths.root.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, r.paths.config)
        # a resumed run continues the metrics of its checkpoint; lines a killed run wrote after it are dropped
        r.log.rewind(lambda rec: rec["step"] <= r.step)
        log.info(plan.describe())
        if plan.join:
            log.info("join index of %s cache rows in %s: %s", f"{plan.join_estimate['rows']:,}", index,
                     f"built in {time.perf_counter() - t0:.1f} s" if built else "reused")  # fmt: skip
    D.barrier()
    pairing = plan.pairing(r.cache, r.fields, index, shuffle_seed(cfg))
    if plan.join:
        pairing.info["join_index"] = {"dir": str(index), "rows": plan.join_estimate["rows"], "built_now": built}
    negatives = _negatives(r)
    spec = StreamSpec(
        shards=shards,
        pairing=pairing,
        image_spec=r.model.image_spec,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=r.rank,
        world_size=r.world,
        num_workers=cfg.data.workers,
        field_weights=dict(cfg.data.caption_weights),
        shuffle_shards=cfg.data.shuffle_shards,
        shuffle_buffer=cfg.data.shuffle_buffer,
        crop_scale=tuple(cfg.data.random_crop_scale),
        hflip=cfg.data.hflip,
        start=r.positions,
        rotation=r.step % max(1, cfg.data.workers),
        image_cache=r.image_cache.dir if r.image_cache is not None else None,
        feature=cfg.model.vision.feature,
        positives=cfg.loss.positives,
        negatives=negatives,
        hard_negatives=cfg.loss.hard_negatives,
    )
    loader = make_loader(spec, pin_memory=r.device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor)
    return pairing, loader


def _negatives(r: Run):
    """The mined neighbours' bank (`loss.hard_negatives`, see negatives.py), its tables built before the other
    ranks open them; None without."""
    if not r.cfg.loss.hard_negatives:
        return None
    from l2c.trainer.vision.negatives import plan_negatives

    where = r.cfg.loss.negatives or f"{r.cache.dir}/negatives"
    args = (r.cache, where, r.run, r.fields)
    bank = plan_negatives(*args, main=True, max_rows=r.cfg.data.join_max_rows) if r.main else None
    D.barrier()
    return bank or plan_negatives(*args, main=False, max_rows=r.cfg.data.join_max_rows)


def train_step(r: Run, batch: dict, autocast) -> torch.Tensor:
    """One optimiser step on `batch`; advances the step, data position and digest. Returns the loss.

    A batch may hold several captions per image (`owner`) and mined negatives (`negatives`, `negative_owner`):
    the adapter takes them all in one pass and the loss sorts them out (loss.py)."""
    feats = batch["features"].to(r.device, non_blocking=True) if "features" in batch else None  # --image-cache
    pixels = batch["pixel_values"].to(r.device, non_blocking=True) if feats is None else None
    vectors = batch["vectors"].to(r.device, non_blocking=True)
    n_txt = vectors.shape[0]
    if "negatives" in batch:
        vectors = torch.cat([vectors, batch["negatives"].to(r.device, non_blocking=True)])
    extra = {k: batch[b].to(r.device) for k, b in (("owner", "owner"), ("extra_owner", "negative_owner")) if b in batch}
    with autocast:
        raw = getattr(r.loss_fn, "wants_raw", False)  # a nested loss cuts the features before normalising
        img, txt, scale, bias = r.net(pixels, vectors, features=feats, normalize=not raw)
        if "negatives" in batch:
            txt, extra["extra"] = txt[:n_txt], txt[n_txt:]
        loss = r.loss_fn(img, txt, scale, bias, **extra)
    if not torch.isfinite(loss.detach()):
        raise NonFinite(f"step {r.step + 1}: the loss is {float(loss.detach())}; the run stops here (its last checkpoint is "
                        f"the last good state; lower optim.lr or check the text cache with `l2c cache-info`)")  # fmt: skip
    r.opt.zero_grad(set_to_none=True)
    loss.backward()  # bf16 autocast needs no loss scaling
    norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.cfg.optim.grad_clip or float("inf"))
    if not torch.isfinite(norm):
        bad = next((n for n, p in r.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()), "?")
        raise NonFinite(f"step {r.step + 1}: the gradient of {bad} is not finite (loss {float(loss):.4g}); the run "
                        "stops here (its last checkpoint is the last good state; lower optim.lr)")  # fmt: skip
    r.opt.step()
    r.sched.step()
    r.step += 1
    slot, epoch, emitted = batch["pos"]
    r.positions[int(slot)] = (int(epoch), int(emitted))
    r.stats.update(batch["stats"])
    _merge_examples(r.examples, batch["examples"])
    r.digest = _digest(r.digest, batch["keys"])
    r.samples_seen += len(batch["keys"]) * r.world
    return loss.detach().float()


def checkpoint(r: Run, shards: list[str]) -> None:
    """Every rank's RNG and data position into one checkpoint (trainer/checkpoint.py), written by rank 0, then synced."""
    data = {"positions": r.positions, "stats": dict(r.stats), "examples": r.examples, "digest": r.digest}
    all_data, all_rng = D.all_gather_object(data), D.all_gather_object(rng_state())
    if not r.main:
        return
    state = {
        "step": r.step,
        "samples_seen": r.samples_seen,
        "optimizer": r.opt.state_dict(),
        "scheduler": r.sched.state_dict(),
        "rng": all_rng,
        "data": all_data,
        "cache_fingerprint": r.cache.fingerprint,
        "teacher": r.cache.teacher.to_dict(),
        "world_size": r.world,
        "num_workers": r.cfg.data.workers,
        "shards": shards,
        "config": to_dict(r.cfg),
    }
    save_checkpoint(r.paths.root, r.step, state, r.cfg.keep_checkpoints, weights=r.model.state_dict())
    r.run.sync()  # an object-store --out: what changed, the checkpoint last
    log.info("checkpoint at step %d in %s", r.step, r.run.display("checkpoints"))


class NonFinite(JobFailed):
    """A non-finite loss or gradient: the run stops (exit 1), its last checkpoint is the last good state."""


def train(job: TrainJob, device: str | torch.device | None = None, on_step=None, report=None) -> dict:
    """Train (or resume) `job`; see `_train`. SIGTERM stops it cleanly (data workers included). The run
    directory is locked for the run (a second train-vision into it is refused at once)."""
    with _sigterm_exits(), _run_lock(job):
        return _train(job, device, on_step, report)


@contextmanager
def _run_lock(job: TrainJob):
    """`OUT/.l2c-lock.json` held by this process (rank 0 of a run started here; a Ray Train driver holds it for
    its workers), taken over from a holder that died on this host."""
    if job.extra.get("locked") or int(os.environ.get("RANK", "0")) != 0 or D.rank() != 0:
        yield
        return
    from l2c.lock import OutputLock

    out = Store(job.out)
    out.makedirs()
    with OutputLock.acquire(out, "train-vision"):
        yield


def _train(job: TrainJob, device: str | torch.device | None = None, on_step=None, report=None) -> dict:
    """Train (or resume) `job`; returns the summary dict (also written to `out/summary.json`).

    `on_step(step, loss)` is called after every step and `report(metrics_row)` after every logged one
    (Ray Train passes `ray.train.report`).
    """
    r, ckpt = setup(job, device)
    resume(r, ckpt)
    cfg = r.cfg
    shards = _input_shards(r)
    pairing, loader = make_stream(r, shards)
    log.info("training %s: %d shard(s), %s pairing, rank %d of %d on %s", r.run.display(), len(shards),
             pairing.mode, r.rank, r.world, r.device)  # fmt: skip

    last = cfg.steps if job.max_steps is None else min(cfg.steps, r.step + job.max_steps)
    deadline = time.monotonic() + 60 * job.max_minutes if job.max_minutes else None
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and r.device.type == "cuda")
    autocast = torch.autocast(r.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    r.net.train()
    it = iter(loader)
    prog = ProgressBar(rate=False, fields="loss {loss:.4f}  {ips:.0f} img/s  wait {wait:.0%}", enabled=job.progress and r.main)
    task = prog.add("train", total=cfg.steps, completed=r.step, loss=float("nan"), ips=0.0, wait=0.0)
    win = Counter()  # data wait, step time and images since the last logged step
    stopped_by = "steps"
    t_prev = time.perf_counter()
    _warn_coverage(r, shards)
    warned = False
    with prog:
        while r.step < last:
            batch = _next_batch(it)
            if not warned and 4 * (len(batch["keys"]) - len(set(batch["keys"]))) >= len(batch["keys"]):
                warned = _warn_repeats(r, batch["keys"])  # a quarter copies; a few at an epoch's end are no misuse
            t_data = time.perf_counter()
            loss = train_step(r, batch, autocast)
            t_end = time.perf_counter()
            win.update(wait=t_data - t_prev, time=t_end - t_prev, imgs=len(batch["keys"]) * r.world)
            t_prev = t_end
            if r.step % cfg.log_every == 0 or r.step == last:
                row = _log_row(r, float(loss), win, int(batch["pos"][1]))
                if r.main:
                    r.log.write(row)
                    prog.update(task, completed=r.step, loss=row["loss"], ips=row["images_per_s"],
                                wait=row["data_wait"])  # fmt: skip
                if report is not None:
                    report(row)
                win.clear()
            if on_step is not None:
                on_step(r.step, float(loss))
            if r.step % cfg.checkpoint_every == 0 and r.step < last:
                checkpoint(r, shards)
            if deadline is not None and D.all_reduce_sum({"stop": float(time.monotonic() > deadline)})["stop"] > 0:
                stopped_by = "max_minutes"
                break
    if r.step == last and last < cfg.steps:
        stopped_by = "max_steps"
    del it
    checkpoint(r, shards)
    return finish(r, pairing, shards, stopped_by)


def _warn_repeats(r: Run, keys: list[str]) -> bool:
    """A batch holding an image more than once: its copies are false negatives to each other."""
    log.warning("batch_size %d is more than the images a data worker has per epoch: a batch holds %d distinct images "
                "(each about %.1f times), and copies of one image count as negatives of each other; lower batch_size "
                "or data.workers", r.cfg.batch_size, len(set(keys)), len(keys) / max(1, len(set(keys))))  # fmt: skip
    return True


def _warn_coverage(r: Run, shards: list[str]) -> None:
    """A schedule that does not see each image once (estimated from the cache rows of these tars' shards)."""
    if not r.main:
        return
    named = [r.cache.shard_for_source(u) for u in shards]
    first = next((n for n in named if n and r.cache.manifest.shards[n].rows), None) or r.cache.shard_names[0]
    keys = r.cache.read_shard(first, ["key"]).column("key")
    per_key = max(1.0, len(keys) / max(1, len(keys.unique())))  # rows per image: captions per key
    rows = sum(r.cache.manifest.shards[n].rows for n in named if n) if all(named) else len(r.cache)
    images, seen = int(rows / per_key), r.cfg.steps * r.cfg.batch_size * r.world
    if images and seen < images:
        log.warning("steps x batch_size = %d samples, fewer than the ~%d images of the data: the run will see about "
                    "%.0f%% of them once", seen, images, 100 * seen / images)  # fmt: skip


def _input_shards(r: Run) -> list[str]:
    """The image tars (--images; with only --image-cache, the tars it was made from), the image cache checked."""
    if not getattr(r.job, "image_cache", None):
        return expand_shards(r.job.images, what="image shard")
    from l2c.image_cache import ImageCache
    from l2c.trainer.vision.head import feature_width
    from l2c.trainer.vision.image_cache import check_image_cache, image_cache_shards

    r.image_cache = cache = ImageCache(r.job.image_cache)
    shards = expand_shards(r.job.images, what="image shard") if r.job.images else image_cache_shards(cache)
    check_image_cache(r.cfg, cache, r.cache, r.model.image_spec, feature_width(r.model.tower), shards)
    return shards


def _next_batch(it) -> dict:
    """The next batch; an `L2CError` raised in a data worker (bad data, a damaged cache shard) comes back as its
    own one-line message."""
    try:
        return next(it)
    except L2CError as e:
        lines = str(e).strip().splitlines()
        last = lines[-1] if lines else str(e)
        prefix = f"{type(e).__module__}.{type(e).__name__}: "
        raise type(e)(last[len(prefix) :] if last.startswith(prefix) else last) from None


@contextmanager
def _sigterm_exits():
    """SIGTERM ends the run through Python (SystemExit), so the data workers are shut down with it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _log_row(r: Run, loss: float, win: Counter, epoch: int) -> dict:
    t = max(win["time"], 1e-9)
    row = {
        "step": r.step,
        "loss": D.all_reduce_sum({"loss": loss})["loss"] / r.world,
        "lr": r.opt.param_groups[0]["lr"] / r.opt.param_groups[0].get("lr_scale", 1.0),
        "logit_scale": float(r.model.scale().detach()),
        "images_per_s": win["imgs"] / t,
        "data_wait": win["wait"] / t,
        "epoch": epoch,
        "samples_seen": r.samples_seen,
        "data_digest": r.digest[:16],
    }
    if r.model.logit_bias is not None:
        row["logit_bias"] = float(r.model.logit_bias.detach())
    return row


def pairing_report(info: dict, built_by_rank: list[bool]) -> dict:
    """What data_skips.json says of the pairing: tars per kind, the first without a shard, the join index and
    which ranks built it at this start (none when an earlier start or another run here had built it)."""
    out = {k: v for k, v in info.items() if k != "join_index"}
    if info.get("join_index"):
        ranks = [i for i, b in enumerate(built_by_rank) if b]
        out["join_index"] = {**{k: v for k, v in info["join_index"].items() if k != "built_now"}, "built_by_ranks": ranks}
    return out


def finish(r: Run, pairing, shards: list[str], stopped_by: str) -> dict:
    """Skip report, curves, export and summary (rank 0), after every rank's counts are summed."""
    totals = D.all_reduce_sum({k: float(r.stats.get(k, 0)) for k in SKIP_KINDS})
    all_examples = D.all_gather_object(r.examples)
    built = D.all_gather_object(bool((pairing.info.get("join_index") or {}).get("built_now")))
    summary = None
    if r.main:
        paths, cfg = r.paths, r.cfg
        merged: dict[str, list[str]] = {}
        for ex in all_examples:
            _merge_examples(merged, ex)
        skips = {
            "counts": {k: int(v) for k, v in totals.items()},
            "note": "counted per sample streamed: a key read in several epochs is counted in each",
            "examples": merged,
            "pairing": pairing.mode,
            **pairing_report(pairing.info, built),
            "shards": len(shards),
            "samples_seen": r.samples_seen,
        }
        atomic.write_json(paths.skips, skips)
        plot_metrics(paths.metrics, paths.plot)
        export_model(
            r.model,
            paths.export,
            r.processor,
            r.cache.teacher,
            r.fields,
            extra={"train_steps": r.step, "samples_seen": r.samples_seen, "loss": cfg.loss.kind},
        )
        rows = r.log.records()
        tail = rows[-5:]
        summary = {
            "run_dir": r.run.display(),
            "step": r.step,
            "steps": cfg.steps,
            "finished": r.step >= cfg.steps,
            "stopped_by": stopped_by,
            "resumed_from": r.resumed_from,
            "samples_seen": r.samples_seen,
            "final_loss": rows[-1]["loss"] if rows else None,
            "images_per_s": (sum(x["images_per_s"] for x in tail) / len(tail)) if rows else None,
            "data_wait": (sum(x["data_wait"] for x in tail) / len(tail)) if rows else None,
            "world_size": r.world,
            "device": str(r.device),
            "skips": skips["counts"],
            "pairing": {k: skips[k] for k in ("pairing", "aligned_tars", "join_tars", "tars_without_cache_shard")},
            "export": r.run.display("export"),
        }
        atomic.write_json(paths.summary, summary)
        r.run.sync()
        log.info("run %s: step %d/%d, stopped by %s, final loss %s; exported to %s", summary["run_dir"], r.step,
                 cfg.steps, stopped_by, summary["final_loss"], summary["export"])  # fmt: skip
    D.barrier()
    return summary or {}


def _ray_worker(args: dict) -> None:
    import ray.train

    def report(row: dict) -> None:
        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    train(args["job"], device=args["device"], report=report)


def train_on_ray(job: TrainJob) -> dict:
    """`job` on `job.workers` Ray Train workers (one CPU, or one GPU, each); returns the run summary."""
    import tempfile

    from l2c.trainer.ray_train import launch

    run = Store(job.out)  # a path every node shares, or an object-store URL (rank 0 syncs its staging copy)
    run.makedirs()
    storage = f"{run.root}/ray" if run.local else tempfile.mkdtemp(prefix="l2c-ray-train-")  # metrics only
    # absolute paths or URLs: workers run elsewhere
    job = replace(job, text_cache=Store(job.text_cache).url, out=run.url, progress=False,
                  image_cache=Store(job.image_cache).url if job.image_cache else None)
    from l2c.lock import OutputLock

    job = replace(job, extra={**job.extra, "locked": True})  # the driver holds the run's lock for its workers
    with OutputLock.acquire(run, "train-vision"):
        launch(_ray_worker, {"job": job}, name="train-vision", workers=job.workers, storage=storage,
               use_gpu=job.use_gpu, ray_address=job.ray_address)  # fmt: skip
    return json.loads(run.read_text("summary.json"))


def run_train_vision(job: TrainJob) -> dict:
    """The function behind `l2c train-vision`: in-process when `job.workers` is 0, else a Ray Train job."""
    return train_on_ray(job) if job.workers > 0 else train(job)
