"""Caption-contrastive fine-tuning of a text encoder (LLM2CLIP stage 1), in one process or on Ray Train.

    OUT/config.yaml         the full config of the run (rerun it with --config OUT/config.yaml)
    OUT/metrics.jsonl       one record per step ({"type": "train"}) and per evaluation ({"type": "eval"})
    OUT/checkpoints/        {stage}-XXXXXXXX/ (trainer/checkpoint.py): trainable weights, optimiser, scheduler, RNGs
    OUT/adapters/mntp/      the MNTP-stage LoRA adapter (merged into the base before the contrastive stage)
    OUT/adapter/            the contrastive LoRA adapter (on the MNTP-merged base)
    OUT/model/              the merged model + tokenizer + l2c_text_encoder.json: load it anywhere
    OUT/result.json         summary; OUT/loss.png, OUT/cra.png curves

`train_worker` is the loop on every worker; `finetune_text` starts it (here or on Ray) and reports.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from l2c import atomic
from l2c.config import ConfigError, dump_config, from_dict, to_dict
from l2c.trainer import checkpoint as ckpt
from l2c.trainer import distributed as D
from l2c.trainer.checkpoint import Checkpoint, rng_state, set_rng_state
from l2c.trainer.resume import ResumeError, check_changes
from l2c.trainer.runlog import RunLog, read_metrics
from l2c.trainer.schedule import make_scheduler
from l2c.trainer.text.config import RESUME_SAFE, FinetuneTextConfig

STAGES = ("mntp", "contrastive")
CKPT_DIR = "checkpoints"
DONE = "result.json"
# all that finetune-text writes in its --out (a folder holding only these is its own earlier run)
RUN_NAMES = (CKPT_DIR, "adapters", "adapter", "model", "metrics.jsonl", DONE, "progress.json", "config.yaml",
             "data_report.json", "loss.png", "cra.png", ".l2c-lock.json")  # fmt: skip


# ---------------------------------------------------------------- metrics and checkpoints


def stage_key(stage: str, step: int) -> tuple[int, int]:
    return STAGES.index(stage), step


def list_checkpoints(out: Path) -> list[Checkpoint]:
    return ckpt.list_checkpoints(out, STAGES)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in D.unwrap(model).named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, stage: str, step: int, model, optimizer, scheduler, info: dict, keep: int):
    """`checkpoints/{stage}-{step}/` in the trainers' one format: trainable weights, optimiser, scheduler and
    every rank's RNG (gathered), written by rank 0."""
    rngs = D.all_gather_object(rng_state())
    if D.rank() == 0:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs}
        ckpt.save_checkpoint(out, step, state, keep, name=stage, weights=trainable_state(model),
                             meta={"stage": stage, **info}, order=STAGES)  # fmt: skip
    D.barrier()


def load_checkpoint(checkpoint: Checkpoint, model, optimizer, scheduler) -> dict:
    """Restore weights, optimiser, scheduler and this rank's RNG; returns checkpoint.json's content."""
    saved = ckpt.load_checkpoint(checkpoint)
    state = saved["weights"] or {}
    missing = set(trainable_state(model)) - set(state)
    if missing:
        raise ConfigError(f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
    D.unwrap(model).load_state_dict(state, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if D.rank() < len(saved["rng"]):
        set_rng_state(saved["rng"][D.rank()])
    return saved["meta"]


# ---------------------------------------------------------------- model set-up


def add_lora(model: torch.nn.Module, cfg: FinetuneTextConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lc = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.peft_targets(),
        task_type=TaskType.FEATURE_EXTRACTION,
    )
    return get_peft_model(model, lc)


def prepare_trainable(model: torch.nn.Module, cfg: FinetuneTextConfig) -> torch.nn.Module:
    """LoRA adapters (base frozen) or every weight trainable; gradient checkpointing if asked."""
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int, total: int, schedule: str):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    return opt, make_scheduler(opt, total, warmup, schedule)


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    """What one worker holds across the stages."""

    cfg: FinetuneTextConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    log: RunLog
    started: float
    deadline: float | None
    on_step: Callable[[dict], None] | None = None
    last_step: int = 0  # the contrastive stage's last step done
    stopped_by: str = ""  # "max_minutes" (the model is still exported) or "max_steps" (not)
    info: dict = field(default_factory=dict)

    def should_stop(self, stage: str, step: int) -> str:
        """Why to stop after this step ("" to go on); rank 0 decides for all."""
        reason = 0
        if self.deadline is not None and time.monotonic() > self.deadline:
            reason = 1
        elif stage == "contrastive" and 0 < self.cfg.train.max_steps <= step:
            reason = 2
        reason = D.broadcast_int(reason)
        return ("", "max_minutes", "max_steps")[reason]


def run_stage(
    run: Run,
    stage: str,
    model: torch.nn.Module,
    total: int,
    lr: float,
    step_loss: Callable[[torch.nn.Module, int], tuple[torch.Tensor, dict]],
    resume_from: Checkpoint | None,
    after_step: Callable[[int], None] | None = None,
) -> bool:
    """Optimise `step_loss` for steps (resume step + 1) .. total. False if stopped early (checkpointed)."""
    t = run.cfg.train
    opt, sched = make_optimizer(model, lr, t.weight_decay, t.warmup_steps, total, t.schedule)
    step = 0
    if resume_from is not None and resume_from.name == stage:
        step = load_checkpoint(resume_from, model, opt, sched)["step"]
    model = D.wrap_ddp(model, run.device, find_unused=True)  # full fine-tuning leaves e.g. BERT's pooler out
    params = [p for p in model.parameters() if p.requires_grad]
    last = time.monotonic()
    while step < total:
        step += 1
        loss, extra = step_loss(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        now = time.monotonic()
        rec = {
            "type": "train",
            "stage": stage,
            "step": step,
            "total": total,
            "loss": float(loss.detach()),
            "lr": sched.get_last_lr()[0],
            "grad_norm": float(gnorm),
            "step_s": round(now - last, 4),
            "elapsed_s": round(now - run.started, 2),
            **extra,
        }
        run.log.write(rec)
        run.last_step = step
        if run.on_step is not None:
            run.on_step(rec)
        if after_step is not None:
            after_step(step)
        stop = run.should_stop(stage, step) if step < total else ""
        if step % t.checkpoint_every == 0 or step == total or stop:
            save_checkpoint(run.out, stage, step, model, opt, sched, {"total": total}, t.keep_checkpoints)
        if stop:
            run.stopped_by = stop
            return False
        last = time.monotonic()  # evaluation and checkpoint time stay out of the step time
    return True


def run_mntp(run: Run, model, tokenizer, info: dict, sentences: list[str], resume_from: Checkpoint | None):
    """MNTP stage; returns the model with the stage's training merged in, or None if stopped early."""
    from l2c.models import resolve_model
    from l2c.trainer.text.mntp import MntpBatcher, load_lm_head, mntp_loss

    cfg = run.cfg
    stage_dir = run.out / "adapters" / "mntp"
    if (stage_dir / "DONE").exists():
        return restore_mntp(run, model)
    if not info["is_decoder"]:
        raise ConfigError(f"mntp is for decoder LLMs; {info['model_type']} is already a bidirectional encoder")
    head = load_lm_head(resolve_model(cfg.model.path), model).to(run.device)
    model = prepare_trainable(model, cfg)
    batcher = MntpBatcher(
        tokenizer, sentences, cfg.mntp.batch_size, cfg.model.max_length, cfg.mntp.mask_prob,
        cfg.mntp.mask_token, seed=cfg.train.seed, vocab_size=head.shape[0],
    )  # fmt: skip

    def step_loss(net, step):
        b = batcher.batch(step - 1)
        lo, hi = run.rank * len(b["input_ids"]) // run.world, (run.rank + 1) * len(b["input_ids"]) // run.world
        b = {k: v[lo:hi].to(run.device) for k, v in b.items()}
        hidden = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return mntp_loss(hidden, b["labels"], head), {"targets": int((b["labels"] != -100).sum())}

    resume = resume_from if resume_from is not None and resume_from.name == "mntp" else None
    if not run_stage(run, "mntp", model, cfg.mntp.steps, cfg.mntp.lr, step_loss, resume):
        return None
    model = D.unwrap(model)
    if run.rank == 0:
        tmp = atomic.tmp_dir_for(stage_dir)
        if cfg.lora.enabled:
            model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "DONE").write_text("mntp finished\n")
        atomic.replace_dir(tmp, stage_dir)
    D.barrier()
    merged = model.merge_and_unload() if cfg.lora.enabled else model
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def restore_mntp(run: Run, model):
    """Re-apply a finished MNTP stage to a freshly loaded base model."""
    stage_dir = run.out / "adapters" / "mntp"
    if (stage_dir / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(stage_dir)).merge_and_unload()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(stage_dir / "model.safetensors")))
    return model


def train_worker(job: dict) -> None:
    """The whole run on one worker (rank 0 writes files). `job`: cfg (dict), out, resume, progress."""
    from transformers.utils import logging as hf_logging

    from l2c.pipeline.encoder import load_text_model
    from l2c.teacher import TeacherSpec, build_text_encoder
    from l2c.trainer.text.data import PairSampler, load_caption_groups, load_sentences
    from l2c.trainer.text.eval import load_cra_set
    from l2c.trainer.text.loss import info_nce, pair_accuracy

    hf_logging.disable_progress_bar()
    cfg = from_dict(FinetuneTextConfig, job["cfg"])
    out = Path(job["out"])
    rank, n_workers = D.rank(), D.world_size()
    device = D.pick_device(job.get("device"))
    started = time.monotonic()
    deadline = started + 60 * cfg.train.max_minutes if cfg.train.max_minutes > 0 else None
    ckpts = list_checkpoints(out) if job.get("resume", True) else []
    resume_from = ckpts[-1] if ckpts else None
    log = RunLog(out / "metrics.jsonl", rank == 0)
    upto = resume_from.key if resume_from else None
    log.rewind(None if upto is None else (lambda r: stage_key(r["stage"], r["step"]) <= upto))
    run = Run(cfg, out, rank, n_workers, device, log, started, deadline, job.get("on_step"))

    seed = cfg.train.seed
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)

    model, tokenizer, info = load_text_model(
        cfg.model.path, dtype=cfg.model.dtype, device=str(device), bidirectional=cfg.model.bidirectional,
        prompt_format=cfg.model.prompt_format,
    )
    run.info = info
    groups, report = load_caption_groups(
        cfg.data.pairs, cfg.data.key_field, cfg.data.captions_field, cfg.data.min_chars
    )
    sentences = load_sentences(cfg.data.text_corpus) if cfg.data.text_corpus else None
    if rank == 0:
        atomic.write_json(out / "data_report.json", report.__dict__)

    if cfg.mntp.enabled:
        mntp_text = sentences or [c for g in groups for c in g.captions]
        model = run_mntp(run, model, tokenizer, info, mntp_text, resume_from)
        if model is None:
            if rank == 0:
                write_summary(out, cfg, False, 0, run.stopped_by)
            return

    sampler = PairSampler(groups, cfg.train.batch_size, seed, cfg.data.text_ratio, sentences)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * sampler.steps_per_epoch))
    model = prepare_trainable(model, cfg)
    model.to(device)
    eval_sets = [load_cra_set(p) for p in cfg.eval.captions]
    teacher = TeacherSpec(model=str(cfg.model.path), model_path=info["path"], pooling=cfg.model.pooling,
                          prompt_format=info["prompt_format"], max_length=cfg.model.max_length, dtype=info["dtype"],
                          bidirectional=info["bidirectional"], dim=info["dim"], is_decoder=info["is_decoder"])  # fmt: skip

    def evaluate(net, step: int, full: bool) -> None:
        if rank != 0 or not eval_sets:
            return
        base = D.unwrap(net)
        was_training = base.training
        base.eval()
        enc = build_text_encoder(teacher, loaded=(base, tokenizer, info))
        for s in eval_sets:
            sub = s if full else s.head(cfg.eval.max_images)
            from l2c.trainer.text.eval import measure_cra

            res = measure_cra(enc, sub)
            log.write({"type": "eval", "stage": "contrastive", "step": step, "set": s.name, "full": full, **res})
        base.train(was_training)

    fresh = resume_from is None or resume_from.name != "contrastive"
    if fresh:
        evaluate(model, 0, full=True)
        if cfg.eval.max_images and any(len(s.keys) > cfg.eval.max_images for s in eval_sets):
            evaluate(model, 0, full=False)

    encoders: dict = {}

    def step_loss(net, step):
        batch = sampler.batch(step - 1)
        if id(net) not in encoders:
            encoders[id(net)] = build_text_encoder(replace(teacher, normalize=False), loaded=(net, tokenizer, info))
        enc = encoders[id(net)]
        mine = batch.shard(rank, n_workers)
        emb = enc.embed_batch(mine.a + mine.b)
        a, b = D.gather_with_grad(emb[: len(mine)]), D.gather_with_grad(emb[len(mine) :])
        group = torch.tensor(batch.group[: len(a)], device=a.device)
        loss = info_nce(a, b, cfg.train.temperature, group, cfg.train.symmetric)
        return loss, {"pairs": len(a), "acc": round(pair_accuracy(a, b, group), 4),
                      "epoch": round(sampler.epoch_of(step), 4)}  # fmt: skip

    def after_step(step: int) -> None:
        if eval_sets and step % cfg.eval.every == 0 and step < total:
            evaluate(current["model"], step, full=False)

    current = {"model": model}
    resume = resume_from if resume_from is not None and resume_from.name == "contrastive" else None
    run.last_step = resume.step if resume is not None else 0
    if resume is None or resume.step < total:
        run_stage(run, "contrastive", model, total, cfg.train.lr, step_loss, resume, after_step)
    finished = run.stopped_by in ("", "max_minutes")  # a time bound ends the run with a model
    if rank == 0:
        if finished:
            from l2c.trainer.text.export import export_text_model

            settings = {**teacher.encoder_settings(), "bidirectional": info["bidirectional"],
                        "is_decoder": info["is_decoder"], "base_model": str(cfg.model.path),
                        "finetuned_steps": run.last_step, "mntp": cfg.mntp.enabled, "lora": cfg.lora.enabled}  # fmt: skip
            merged = export_text_model(model, tokenizer, out / "model", settings, out / "adapter")
            if cfg.eval.max_images:
                evaluate(merged, run.last_step, full=False)
            evaluate(merged, run.last_step, full=True)
        write_summary(out, cfg, finished, total, run.stopped_by)
    D.barrier()


# ---------------------------------------------------------------- summary and driver


def write_summary(out: Path, cfg: FinetuneTextConfig, finished: bool, total: int, stopped_by: str = "") -> dict:
    """result.json and the PNG curves from metrics.jsonl (so they agree across resumes)."""
    from l2c.trainer.plots import plot_cra, plot_loss

    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train" and r["stage"] == "contrastive"]
    mntp = [r for r in records if r["type"] == "train" and r["stage"] == "mntp"]
    tail = train[-max(1, min(50, len(train) // 10)) :] if train else []
    cra: dict[str, dict] = {}
    for r in records:
        if r["type"] == "eval" and r["full"]:
            entry = cra.setdefault(r["set"], {})
            entry.setdefault("before", {k: r[k] for k in ("step", "cra_top1", "cra_top5", "n")})
            entry["after"] = {k: r[k] for k in ("step", "cra_top1", "cra_top5", "n")}
    steps = train[-1]["step"] if train else 0
    result = {
        "finished": finished,  # the model was exported
        "complete": finished and steps >= total,  # ... after the whole schedule
        "stopped_by": stopped_by,
        "steps": steps,
        "total_steps": total,
        "mntp_steps": mntp[-1]["step"] if mntp else 0,
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
        "pairs_per_s": (sum(r["pairs"] for r in tail) / max(sum(r["step_s"] for r in tail), 1e-9)) if tail else None,
        "train_seconds": round(sum(r["step_s"] for r in train + mntp), 1),
        "cra": cra,
        "model": str(out / "model") if finished else None,
        "adapter": str(out / "adapter") if finished and cfg.lora.enabled else None,
    }
    plots = {}
    if plot_loss(records, out / "loss.png"):
        plots["loss"] = str(out / "loss.png")
    if plot_cra(records, out / "cra.png"):
        plots["cra"] = str(out / "cra.png")
    result["plots"] = plots
    atomic.write_json(out / (DONE if finished else "progress.json"), result)
    (out / ("progress.json" if finished else DONE)).unlink(missing_ok=True)
    return result


def check_resumable(out: Path, cfg: FinetuneTextConfig) -> None:
    """A checkpoint is reused only by a run whose settings match the run that wrote it, but for RESUME_SAFE keys."""
    import yaml

    saved_path = out / "config.yaml"
    if saved_path.exists():
        check_changes(yaml.safe_load(saved_path.read_text()) or {}, to_dict(cfg), RESUME_SAFE, f"run {out}",
                      to_dict(FinetuneTextConfig()))


def finetune_text(
    cfg: FinetuneTextConfig,
    out: str | Path,
    resume: bool | None = None,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) a fine-tune into `out`; returns result.json's content (progress.json's if stopped early).

    resume: None resumes when `out` has a checkpoint, True requires one, False starts afresh (refusing to
    mix with an earlier run's checkpoints unless `overwrite`).
    """
    cfg.check_runnable()
    from l2c.storage import Store

    if not Store(out).local:
        raise ConfigError(
            f"--out {out}: finetune-text writes its run directory on a filesystem (every rank resumes from its "
            "checkpoints); use a path every node mounts, and copy the result to object storage"
        )
    out = Path(Store(out).root)
    out.mkdir(parents=True, exist_ok=True)
    from l2c.lock import OutputLock

    with OutputLock.acquire(Store(out), "finetune-text"):  # a second run into OUT is refused at once
        return _finetune_text(cfg, out, resume, overwrite, on_step)


def _finetune_text(cfg: FinetuneTextConfig, out: Path, resume: bool | None, overwrite: bool, on_step) -> dict:
    done = out / DONE
    if done.exists() and not overwrite and resume is not False:
        result = json.loads(done.read_text())
        if result.get("complete") and cfg.train.steps in (0, result["total_steps"]):
            return {**result, "already_finished": True}
    if overwrite and out.exists():
        for name in (CKPT_DIR, "adapters", "adapter", "model", "metrics.jsonl", DONE, "progress.json"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_tmp(out)
    have = list_checkpoints(out)
    if resume and not have:
        raise ResumeError(f"--resume: {out} holds no checkpoint to resume from")
    if have and resume is False:
        raise ResumeError(f"{out} holds checkpoints (last: {have[-1].path.name}); leave out --no-resume to "
                          "continue the run, pass --overwrite to start it afresh, or pick a new --out")  # fmt: skip
    if have:
        check_resumable(out, cfg)
    dump_config(cfg, out / "config.yaml")
    job = {"cfg": to_dict(cfg), "out": str(out.resolve()), "resume": bool(have)}
    if cfg.dist.num_workers >= 1:
        run_on_ray(job, cfg, on_step)
    else:
        train_worker({**job, "on_step": on_step})
    return json.loads((done if done.exists() else out / "progress.json").read_text())


def run_on_ray(job: dict, cfg: FinetuneTextConfig, on_step: Callable[[dict], None] | None) -> None:
    """`train_worker` on `dist.num_workers` Ray Train workers; progress follows metrics.jsonl."""
    import threading

    from l2c.trainer.ray_train import launch

    stop = threading.Event()
    metrics = Path(job["out"]) / "metrics.jsonl"
    skip = len(read_metrics(metrics)) if job["resume"] else 0

    def follow() -> None:
        seen = skip
        while not stop.wait(0.5):
            recs = read_metrics(metrics)
            for r in recs[seen:]:
                if on_step is not None and r.get("type") == "train":
                    on_step(r)
            seen = max(seen, len(recs))

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        d = cfg.dist
        launch(train_worker, job, name="finetune-text", workers=d.num_workers, storage=str(Path(job["out"]) / "ray"),
               use_gpu=d.use_gpu, cpus_per_worker=d.cpus_per_worker, ray_address=d.ray_address or None)  # fmt: skip
    finally:
        stop.set()
        thread.join()
