"""The one Ray Train launcher of both trainers: N `TorchTrainer` workers, DDP underneath (gloo on CPU).

Every worker runs the trainer's worker function on its rank, with the device Ray Train gives it; rank 0
writes the run directory, so with several nodes it must be on storage all of them share (train-vision also
takes an object-store URL: rank 0 works in a local staging copy and uploads it at every checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

from l2c.ray_utils import init_ray


def _entry(args: dict) -> None:
    import ray.train.torch

    from l2c.log import setup_logging

    setup_logging()  # the worker's INFO lines reach the job's log
    worker = args.pop("_worker")
    worker({**args, "device": str(ray.train.torch.get_device())})


def launch(
    worker: Callable[[dict], None],
    args: dict,
    *,
    name: str,
    workers: int,
    storage: str,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    ray_address: str | None = None,
) -> None:
    """Run `worker(args | {"device": ...})` on `workers` Ray Train workers and wait for all of them.

    Joins the cluster at `ray_address` (or RAY_ADDRESS), else starts a private local Ray and stops it after.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = init_ray(ray_address)
    try:
        resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        TorchTrainer(
            _entry,
            train_loop_config={**args, "_worker": worker},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=name, storage_path=storage),
        ).fit()
    finally:
        if started:
            import ray

            ray.shutdown()
