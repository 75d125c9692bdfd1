"""The training loop behind `l2c train-vision`: one process, or one rank of a DDP job (Ray Train, torchrun)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from l2c import atomic
from l2c.cache import CacheError, TextCache
from l2c.config import dump_config, to_dict
from l2c.storage import RunDir
from l2c.trainer import distributed as D
from l2c.trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from l2c.trainer.config import TrainConfig
from l2c.trainer.data import SKIP_KINDS, StreamSpec, expand_shards, make_loader
from l2c.trainer.export import export_model
from l2c.trainer.loss import make_loss
from l2c.trainer.model import L2CModel
from l2c.trainer.optim import make_optimizer, make_scheduler
from l2c.trainer.pairing import plan_pairing, used_fields
from l2c.trainer.plots import plot_metrics, read_metrics
from l2c.trainer.vision import build_vision_tower, freeze_first_blocks

MAX_EXAMPLES = 20


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed with the given inputs."""


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

    @property
    def index(self) -> Path:
        return self.root / "pairing-index"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def maybe_init_torchrun() -> None:
    """Join the process group torchrun describes (RANK/WORLD_SIZE set), when nobody has yet."""
    if D.is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


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
    )
    freeze_first_blocks(model.tower, cfg.model.vision.freeze_blocks)
    return model, processor


def check_cache(cfg: TrainConfig, cache: TextCache) -> None:
    if cfg.model.text_dim and cfg.model.text_dim != cache.dim:
        raise CacheError(
            f"text cache {cache.dir} holds {cache.dim}-dim vectors but model.text_dim={cfg.model.text_dim}: "
            "the cache was made with another text encoder; re-embed, or set model.text_dim to match"
        )
    if not cache.manifest.shards:
        raise CacheError(f"text cache {cache.dir} has no finished shards")


def _digest(prev: str, keys: list[str]) -> str:
    return hashlib.sha256((prev + "\n" + "\n".join(keys)).encode()).hexdigest()


def _merge_examples(into: dict[str, list[str]], new: dict[str, list[str]]) -> None:
    for k, v in new.items():
        lst = into.setdefault(k, [])
        lst.extend(v[: max(0, MAX_EXAMPLES - len(lst))])


def _progress(total: int, start: int, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s  wait {task.fields[wait]:.0%}"
        ),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    task = prog.add_task("train", total=total, completed=start, loss=float("nan"), ips=0.0, wait=0.0)
    return prog, task


def train(
    cfg: TrainConfig,
    images: str | list[str],
    text_cache: str | Path,
    out: str | Path,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_step=None,
    report=None,
) -> dict:
    """Train (or resume) a run in `out`; returns the summary dict (also written to `out/summary.json`).

    `max_steps` / `max_minutes` stop this invocation early (a checkpoint is written, `--resume` goes on);
    `cfg.steps` is the length of the schedule. `on_step(step, loss)` is called after every step and
    `report(metrics_row)` after every logged one (Ray Train passes `ray.train.report`).
    """
    maybe_init_torchrun()
    rank, world = D.rank(), D.world_size()
    device = pick_device(device)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    main = rank == 0
    run = RunDir(out, tag=f"rank{rank}")  # an object-store --out: a local staging copy, synced at checkpoints
    run.pull()
    paths = RunPaths(run.local)

    cache = TextCache(text_cache)
    check_cache(cfg, cache)
    fields = used_fields(cache, cfg.data.caption_weights)

    ckpt = None
    ckpt_path = latest_checkpoint(paths.root)
    if ckpt_path is not None and not resume:
        raise ResumeError(
            f"{paths.root} already holds checkpoints; pass --resume to continue it, or pick a new --out"
        )
    if resume and ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["cache_fingerprint"] != cache.fingerprint:
            raise CacheError(
                f"text cache fingerprint {cache.fingerprint[:16]}… differs from the one this run was trained on "
                f"({ckpt['cache_fingerprint'][:16]}…): the vectors come from another encoder or settings; "
                "resume with the original cache, or start a new run"
            )
        if ckpt["config"]["model"] != to_dict(cfg)["model"]:
            raise ResumeError(
                f"{ckpt_path} was trained with another model config; resume with the run's own "
                f"{paths.config.name} (--config {paths.config}), or pick a new --out"
            )
        if (ckpt["world_size"], ckpt["num_workers"]) != (world, cfg.data.workers):
            raise ResumeError(
                f"the run was trained with {ckpt['world_size']} rank(s) x {ckpt['num_workers']} data workers; "
                f"resuming with {world} x {cfg.data.workers} would change the data order. Use the same values"
            )

    torch.manual_seed(cfg.seed + rank)
    model, processor = build_model(cfg, cache.dim)
    model.to(device)
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = make_loss(cfg.loss.kind, cfg.loss.gather_with_grad)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim, cfg.steps)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    scaler = torch.amp.GradScaler(
        device.type, enabled=False
    )  # bf16 needs no loss scaling; kept for fp16 forks

    step, samples_seen, digest = 0, 0, ""
    positions: dict[int, tuple[int, int]] = {}
    stats: Counter = Counter()
    examples: dict[str, list[str]] = {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"][rank])
        mine = ckpt["data"][rank]
        positions = {int(k): tuple(v) for k, v in mine["positions"].items()}
        stats = Counter(mine["stats"])
        examples = mine["examples"]
        step, samples_seen, digest = ckpt["step"], ckpt["samples_seen"], mine["digest"]

    shards = expand_shards(images)
    if main:
        paths.root.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, paths.config)
        pairing = plan_pairing(cache, shards, cfg.data.pairing, fields, paths.index)
        # a resumed run continues the metrics of its checkpoint; lines a killed run wrote after it are dropped
        kept = [r for r in read_metrics(paths.metrics) if r["step"] <= step]
        atomic.write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in kept))
    D.barrier()
    if not main:
        pairing = plan_pairing(cache, shards, cfg.data.pairing, fields, paths.index)

    n_workers = cfg.data.workers
    spec = StreamSpec(
        shards=shards,
        pairing=pairing,
        image_spec=model.image_spec,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        num_workers=n_workers,
        field_weights=dict(cfg.data.caption_weights),
        shuffle_shards=cfg.data.shuffle_shards,
        shuffle_buffer=cfg.data.shuffle_buffer,
        crop_scale=tuple(cfg.data.random_crop_scale),
        start=positions,
        rotation=step % max(1, n_workers),
    )
    loader = make_loader(spec, pin_memory=device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor)

    def checkpoint_state() -> dict | None:
        data = {"positions": positions, "stats": dict(stats), "examples": examples, "digest": digest}
        all_data, all_rng = D.all_gather_object(data), D.all_gather_object(rng_state())
        if not main:
            return None
        return {
            "step": step,
            "samples_seen": samples_seen,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": all_rng,
            "data": all_data,
            "cache_fingerprint": cache.fingerprint,
            "world_size": world,
            "num_workers": n_workers,
            "shards": shards,
            "config": to_dict(cfg),
        }

    def write_checkpoint() -> None:
        state = checkpoint_state()
        if main:
            save_checkpoint(paths.root, step, state, cfg.keep_checkpoints)
            run.sync()  # an object-store --out: what changed, the checkpoint last

    last = cfg.steps if max_steps is None else min(cfg.steps, step + max_steps)
    deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
    start_step = step
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    ddp_model.train()
    it = iter(loader)
    prog, task = _progress(cfg.steps, step, progress and main)
    win_wait = win_time = 0.0
    win_imgs = 0
    stopped_by = "steps"
    t_prev = time.perf_counter()
    with prog:
        while step < last:
            batch = next(it)
            t_data = time.perf_counter()
            pixels = batch["pixel_values"].to(device, non_blocking=True)
            vectors = batch["vectors"].to(device, non_blocking=True)
            with autocast:
                img, txt, scale, bias = ddp_model(pixels, vectors)
                loss = loss_fn(img, txt, scale, bias)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            slot, epoch, emitted = batch["pos"]
            positions[int(slot)] = (int(epoch), int(emitted))
            stats.update(batch["stats"])
            _merge_examples(examples, batch["examples"])
            digest = _digest(digest, batch["keys"])
            samples_seen += len(batch["keys"]) * world
            t_end = time.perf_counter()
            win_wait += t_data - t_prev
            win_time += t_end - t_prev
            win_imgs += len(batch["keys"]) * world
            t_prev = t_end

            loss_value = loss.detach().float()
            if step % cfg.log_every == 0 or step == last:
                loss_mean = D.all_reduce_sum({"loss": float(loss_value)})["loss"] / world
                row = {
                    "step": step,
                    "loss": loss_mean,
                    "lr": opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_scale", 1.0),
                    "logit_scale": float(model.scale().detach()),
                    "images_per_s": win_imgs / max(win_time, 1e-9),
                    "data_wait": win_wait / max(win_time, 1e-9),
                    "epoch": int(epoch),
                    "samples_seen": samples_seen,
                    "data_digest": digest[:16],
                }
                if model.logit_bias is not None:
                    row["logit_bias"] = float(model.logit_bias.detach())
                if main:
                    with open(paths.metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    prog.update(
                        task, completed=step, loss=loss_mean, ips=row["images_per_s"], wait=row["data_wait"]
                    )
                if report is not None:
                    report(row)
                win_wait = win_time = 0.0
                win_imgs = 0
            if on_step is not None:
                on_step(step, float(loss_value))
            if step % cfg.checkpoint_every == 0 and step < last:
                write_checkpoint()
            if deadline is not None:
                over = D.all_reduce_sum({"stop": float(time.monotonic() > deadline)})["stop"] > 0
                if over:
                    stopped_by = "max_minutes"
                    break
    if step == last and last < cfg.steps:
        stopped_by = "max_steps"
    del it
    write_checkpoint()

    totals = D.all_reduce_sum({k: float(stats.get(k, 0)) for k in SKIP_KINDS})
    all_examples = D.all_gather_object(examples)
    summary = None
    if main:
        merged: dict[str, list[str]] = {}
        for ex in all_examples:
            _merge_examples(merged, ex)
        skips = {
            "counts": {k: int(v) for k, v in totals.items()},
            "note": "counted per sample streamed: a key read in several epochs is counted in each",
            "examples": merged,
            "pairing": pairing.mode,
            "shards": len(shards),
            "samples_seen": samples_seen,
        }
        atomic.write_json(paths.skips, skips)
        plot_metrics(paths.metrics, paths.plot)
        export_model(
            model,
            paths.export,
            processor,
            cache.settings,
            fields,
            extra={"train_steps": step, "samples_seen": samples_seen, "loss": cfg.loss.kind},
        )
        rows = read_metrics(paths.metrics)
        summary = {
            "run_dir": run.display(),
            "step": step,
            "steps": cfg.steps,
            "finished": step >= cfg.steps,
            "stopped_by": stopped_by,
            "resumed_from": start_step if ckpt is not None else None,
            "samples_seen": samples_seen,
            "final_loss": rows[-1]["loss"] if rows else None,
            "images_per_s": (sum(r["images_per_s"] for r in rows[-5:]) / len(rows[-5:])) if rows else None,
            "data_wait": (sum(r["data_wait"] for r in rows[-5:]) / len(rows[-5:])) if rows else None,
            "world_size": world,
            "device": str(device),
            "skips": skips["counts"],
            "export": run.display("export"),
        }
        atomic.write_json(paths.summary, summary)
        run.sync()
    D.barrier()
    return summary or {}
