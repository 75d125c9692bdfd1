"""Run the training loop as a Ray Train `TorchTrainer` job: N workers, DDP underneath (gloo on CPU).

Every worker runs `loop.train` on its rank; rank 0 writes the run directory, so with several nodes
RUN_DIR must be on storage all of them share, or in an object store (`s3://...`: rank 0 works in a local
staging copy and uploads it at every checkpoint). The summary comes back from `RUN_DIR/summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from l2c.ray_utils import init_ray
from l2c.storage import Store
from l2c.trainer.config import TrainConfig


def _worker_loop(args: dict) -> None:
    import ray.train
    import ray.train.torch

    from l2c.trainer.loop import train

    device = ray.train.torch.get_device()

    def report(row: dict) -> None:
        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    train(
        args["cfg"],
        args["images"],
        args["text_cache"],
        args["out"],
        resume=args["resume"],
        max_steps=args["max_steps"],
        max_minutes=args["max_minutes"],
        device=device,
        progress=False,
        report=report,
    )


def train_with_ray(
    cfg: TrainConfig,
    images: str | list[str],
    text_cache: str | Path,
    out: str | Path,
    workers: int,
    ray_address: str | None = None,
    use_gpu: bool = False,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
) -> dict:
    """Train with `workers` Ray Train workers (one CPU, or one GPU, each); returns the run summary."""
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run = Store(out)  # a path every node shares, or an object-store URL (rank 0 syncs its staging copy)
    run.makedirs()
    storage = f"{run.root}/ray" if run.local else tempfile.mkdtemp(prefix="l2c-ray-train-")  # metrics only
    started = init_ray(ray_address)
    try:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "cfg": cfg,
                "images": images,
                "text_cache": Store(text_cache).url,  # absolute path or URL: workers run elsewhere
                "out": run.url,
                "resume": resume,
                "max_steps": max_steps,
                "max_minutes": max_minutes,
            },
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name="train-vision", storage_path=storage),
        )
        trainer.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    return json.loads(run.read_text("summary.json"))
