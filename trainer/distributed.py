"""torch.distributed for both trainers: rank/world, the device, DDP, all-gather, reductions. No-ops on one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from l2c.devices import pick_device  # noqa: F401  (the trainers' device picker)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def maybe_init_torchrun() -> None:
    """Join the process group torchrun describes (RANK/WORLD_SIZE set), when nobody has yet."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """The model in DistributedDataParallel when there is more than one rank, else as it is."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order; gradients flow back to each rank's own slice."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank; only this rank's slice keeps its gradient (open_clip's default)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of numbers over ranks (same keys on every rank)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank."""
    if world_size() == 1:
        return value
    t = torch.tensor([value])
    dist.broadcast(t, 0)
    return int(t.item())


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
