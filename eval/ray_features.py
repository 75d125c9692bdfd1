"""Image features on a Ray cluster: the shards split into contiguous groups, one task each (one GPU each
with `use_gpu`), the groups' features gathered back in shard order for the search on the driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from l2c.eval.errors import EvalError
from l2c.eval.features import ImageFeatures


def _encode_group(model: str, shards: list[str], batch_size: int, device: str) -> ImageFeatures:
    from l2c.eval.features import extract_image_features
    from l2c.eval.model import load_model

    return extract_image_features(load_model(model, device), shards, batch_size, device)


def extract_on_ray(
    model: str | Path,
    shards: list[str],
    batch_size: int = 64,
    use_gpu: bool = False,
    ray_address: str | None = None,
    tasks: int = 0,
) -> ImageFeatures:
    """`extract_image_features` over the cluster at `ray_address`; `tasks` 0: one per GPU (or CPU), at most
    one per shard. Model and shards must be paths every node can read (a shared mount) or URLs."""
    import ray

    from l2c.ray_utils import init_ray

    model = str(Path(model).resolve()) if Path(model).exists() else str(model)
    shards = [str(Path(s).resolve()) if Path(s).exists() else s for s in shards]
    started = init_ray(ray_address)
    try:
        slots = int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1))
        n = max(1, min(len(shards), tasks or slots))
        groups = [list(g) for g in np.array_split(np.array(shards, dtype=object), n) if len(g)]
        task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(_encode_group)
        parts = ray.get([task.remote(model, g, batch_size, "cuda" if use_gpu else "cpu") for g in groups])
    finally:
        if started:
            ray.shutdown()
    keys = [k for p in parts for k in p.keys]
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise EvalError(f"duplicate image key {dup!r} across shards")
    return ImageFeatures(keys=keys, features=np.concatenate([p.features for p in parts]),
                         skipped=[s for p in parts for s in p.skipped])  # fmt: skip
