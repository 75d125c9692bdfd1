"""Training checkpoints, one format for both trainers, and the RNG state they carry.

    RUN/checkpoints/<name>-XXXXXXXX/   name: `step` (train-vision), `mntp` / `contrastive` (finetune-text)
        model.safetensors   the weights (the whole model for train-vision, the trainable ones for finetune-text)
        state.pt            torch.save of the rest: optimizer, scheduler, every rank's RNG, data position, run facts
        checkpoint.json     {"format": "l2c-checkpoint", "version": 1, "name", "step", ...}: small, readable

A checkpoint is written by rank 0 into `.tmp-<name>-XXXXXXXX/` and renamed when whole (`l2c.atomic.tmp_dir_for`,
`replace_dir`), so a process killed mid-write (kill -9) leaves only a hidden temp directory: listing ignores it
and the next save removes it. Checkpoints sort by (the place of their name in `order`, step), so a text run's
MNTP checkpoints come before its contrastive ones; `save_checkpoint` keeps the newest `keep`.
An object-store run directory (`l2c.storage.RunDir`) uploads `checkpoint.json` last and resumes only from a
checkpoint that has it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from l2c import atomic
from l2c.errors import L2CError

FORMAT, VERSION = "l2c-checkpoint", 1
META, WEIGHTS, STATE = "checkpoint.json", "model.safetensors", "state.pt"
DIR_NAME = re.compile(r"^([a-z][a-z0-9_]*)-(\d{8})$")
STEP = ("step",)  # train-vision's one name


class CheckpointError(L2CError):
    """A checkpoint this version cannot read (another format or version, an older layout)."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory: `name` (`step`, `mntp`, ...), `step`, and its place in the order."""

    name: str
    step: int
    path: Path
    index: int = 0  # the place of `name` in the order the run lists its checkpoints by

    @property
    def key(self) -> tuple[int, int]:
        return self.index, self.step

    def __str__(self) -> str:
        return str(self.path)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(name: str, step: int) -> str:
    return f"{name}-{step:08d}"


def _old_layout(p: Path) -> bool:
    """A single-file `step-XXXXXXXX.pt` or a `{stage}-{step}/` directory with `state.json` (earlier versions)."""
    if p.is_file():
        return re.match(r"^step-\d{8}\.pt$", p.name) is not None
    return (p / "state.json").is_file() and not (p / META).exists()


def list_checkpoints(run_dir: str | Path, order: tuple[str, ...] = STEP) -> list[Checkpoint]:
    """The run's complete checkpoints whose name is in `order`, oldest first (temp directories ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.name.startswith("."):  # `.tmp-` / `.old-`: a write or a removal that did not finish
            continue
        if _old_layout(p):
            raise CheckpointError(
                f"{p} is a checkpoint in the layout of an earlier l2c, which this version does not resume; "
                "finish the run with the version that wrote it, or start a new run directory"
            )
        m = DIR_NAME.match(p.name)
        if m and m.group(1) in order and (p / META).is_file():
            found.append(Checkpoint(m.group(1), int(m.group(2)), p, order.index(m.group(1))))
    return sorted(found, key=lambda c: c.key)


def latest_checkpoint(run_dir: str | Path, order: tuple[str, ...] = STEP) -> Checkpoint | None:
    found = list_checkpoints(run_dir, order)
    return found[-1] if found else None


def _tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tensor sharing memory with another (tied weights, views) is copied,
    which safetensors needs."""
    out, seen = {}, set()
    for k, v in weights.items():
        t = v.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def remove_partial(run_dir: str | Path) -> int:
    """Delete what an interrupted save or prune left (`.tmp-*`, `.old-*`); returns how many."""
    d = checkpoint_dir(run_dir)
    n = 0
    for p in d.glob(".*") if d.is_dir() else ():
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict,
    keep: int,
    *,
    name: str = "step",
    weights: dict[str, torch.Tensor] | None = None,
    meta: dict | None = None,
    order: tuple[str, ...] | None = None,
) -> Checkpoint:
    """Write `checkpoints/<name>-<step>/` (whole or not at all), then keep only the newest `keep`.

    `weights` go to safetensors, `state` (anything torch.save takes) to state.pt, `meta` (JSON) beside them.
    Call on one process (rank 0).
    """
    order = order or (name,)
    if name not in order or not DIR_NAME.match(checkpoint_name(name, step)):
        raise ValueError(f"checkpoint name {name!r} must be lowercase and in {order}")
    from safetensors.torch import save_file

    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    remove_partial(run_dir)
    final = d / checkpoint_name(name, step)
    tmp = atomic.tmp_dir_for(final)
    try:
        files = [STATE]
        if weights is not None:
            save_file(_tensors(weights), str(tmp / WEIGHTS))
            files.insert(0, WEIGHTS)
        torch.save(state, tmp / STATE)
        info = {"format": FORMAT, "version": VERSION, "name": name, "step": step, "files": files, **(meta or {})}
        (tmp / META).write_text(json.dumps(info, indent=2) + "\n")
        for f in [*files, META]:
            _fsync(tmp / f)
        atomic.replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep, order)
    return Checkpoint(name, step, final, order.index(name))


def prune(run_dir: str | Path, keep: int, order: tuple[str, ...] = STEP) -> list[Checkpoint]:
    """Remove all but the newest `keep` checkpoints (each renamed out of sight first); returns those removed."""
    old = list_checkpoints(run_dir, order)[:-keep] if keep > 0 else []
    for c in old:
        gone = c.path.with_name(f".old-{c.path.name}")
        c.path.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
    return old


def read_meta(ckpt: Checkpoint | str | Path) -> dict:
    """checkpoint.json, after checking that this version reads the format."""
    path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this l2c reads {FORMAT!r} version {VERSION}"
        )
    return meta


def load_checkpoint(ckpt: Checkpoint | str | Path) -> dict:
    """The saved `state` plus `weights` (the safetensors tensors, None if none were saved) and `meta`."""
    from safetensors.torch import load_file

    path = ckpt.path if isinstance(ckpt, Checkpoint) else Path(ckpt)
    meta = read_meta(path)
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    weights = load_file(str(path / WEIGHTS)) if (path / WEIGHTS).exists() else None
    return {**state, "weights": weights, "meta": meta}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
