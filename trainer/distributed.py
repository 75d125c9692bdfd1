"""torch.distributed helpers: rank/world, all-gather with gradients, reductions. No-ops on one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        r, n = dist.get_rank(), ctx.n
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty_like(grad[:n])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter: sum everything, keep our slice
        return grad[r * n : (r + 1) * n].clone()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank in rank order; gradients flow back to each rank's own slice."""
    return _GatherWithGrad.apply(x) if is_dist() and world_size() > 1 else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank; only this rank's slice keeps its gradient (open_clip's default)."""
    if not is_dist() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank()] = x
    return torch.cat(parts)


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum a dict of numbers over ranks (same keys on every rank)."""
    if not is_dist() or world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def all_gather_object(obj) -> list:
    if not is_dist() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist() and world_size() > 1:
        dist.barrier()
