"""Where a shard job's stages run: a Ray Data pipeline, or this process when the job is one encoder here.

`embed-captions` and `embed-images` describe their stages once (`Stage`: a class built once per worker, or a
function) and hand one item per source shard to a `Runner`. The `ray` runner maps the stages over a Ray Data
dataset (actor pools for classes, tasks for functions; on a cluster or a local Ray). The `local` runner calls
the same stages in this process, shard after shard: on one machine's CPUs with one encoder, Ray's processes
would only add start-up time and compete for the same cores. `auto` picks `local` only when no Ray is
addressed or already running here and the job's layout is that single encoder; anything else goes to Ray.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from l2c.config import ConfigError

RUNNERS = ("auto", "local", "ray")


@dataclass
class Stage:
    """One stage: `fn` a class (built once per worker with `args`; a Ray actor pool of `actors`) or a function
    (called with `kwargs`; Ray tasks). Both take and return one pyarrow table of shard rows (a function may
    return a dict of columns)."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict | None = None


def check_runner(runner: str, ray_address: str | None = None, **ray_only) -> None:
    """Refuse an unknown runner, and `local` with a Ray cluster to join (`ray_address` or `RAY_ADDRESS`) or
    with other settings that only mean something under Ray (given as flag_name=True when set)."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    ray_only["ray_address"] = bool(ray_address or os.environ.get("RAY_ADDRESS"))
    given = [k for k, v in ray_only.items() if v]
    if runner == "local" and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"--runner local runs one encoder in this process; {flags} need --runner ray")


def encoder_layout(gpus: float, cpus: float, local: bool, num_actors: int | None, gpus_per_actor: float | None,
                   cpus_per_actor: float | None, cpus_per_gpu_actor: float) -> dict:
    """How a job's encoders spread over `gpus`/`cpus`: on GPUs one actor per GPU (or `gpus_per_actor`) holding
    `cpus_per_gpu_actor` CPUs; on CPUs one actor holding all CPUs but one (Ray's own processes keep one), whose
    torch threads are the CPUs it was given. `local`: one encoder, this process."""
    on_gpu = gpus > 0 and gpus_per_actor != 0
    gpus_per = gpus_per_actor or (1 if on_gpu else 0)
    n_actors = 1 if local else num_actors or (max(1, int(gpus // gpus_per)) if on_gpu else 1)
    cpus_per = cpus_per_actor if cpus_per_actor is not None else (cpus_per_gpu_actor if on_gpu else max(1.0, cpus - 1))
    threads = None if on_gpu else max(1, int(cpus_per_actor or cpus / n_actors))
    return {"on_gpu": on_gpu, "gpus_per": gpus_per, "n_actors": n_actors, "cpus_per": cpus_per, "threads": threads}


def local_resources() -> tuple[float, float]:
    """(GPUs, CPUs) this process may use: what a local Ray would report, without starting one."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return float(torch.cuda.device_count()), float(cpus)


class Runner:
    """Runs a job's stages; `gpus`/`cpus` are the resources its layout is planned for."""

    def __init__(self, local: bool, gpus: float, cpus: float, started_ray: bool = False):
        self.local, self.gpus, self.cpus, self._started = local, gpus, cpus, started_ray
        self.name = "local" if local else "ray"

    @classmethod
    def start(cls, runner: str, address: str | None, fits_local: Callable[[float, float], bool]) -> Runner:
        """`fits_local(gpus, cpus)`: whether the job's default layout on this machine is one encoder that reads
        and writes its own shards (what `auto` runs here); a job run with `local` plans that layout itself."""
        check_runner(runner, address)
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        if runner == "local" or (runner == "auto" and not address and not ray_running):
            gpus, cpus = local_resources()
            if runner == "local" or fits_local(gpus, cpus):
                return cls(True, gpus, cpus)
        import ray

        from l2c.ray_utils import init_ray

        started = init_ray(address)
        res = ray.cluster_resources()
        return cls(False, float(res.get("GPU", 0)), float(res.get("CPU", 1)), started)

    def run(self, items: list[dict], stages: list[Stage]) -> Iterator[dict]:
        """The last stage's rows, one dict each, as shards finish (in no fixed order under Ray)."""
        if self.local:
            yield from _run_local(items, stages)
            return
        import ray

        ds = ray.data.from_items(items, override_num_blocks=len(items))
        for s in stages:
            opts: dict = {"batch_size": 1, "batch_format": "pyarrow", "num_cpus": s.num_cpus}
            if s.num_gpus:
                opts["num_gpus"] = s.num_gpus
            if s.resources:
                opts["resources"] = dict(s.resources)
            if isinstance(s.fn, type):
                opts.update(compute=ray.data.ActorPoolStrategy(size=s.actors), fn_constructor_args=s.args)
            else:
                opts["fn_kwargs"] = s.kwargs
            ds = ds.map_batches(s.fn, **opts)
        yield from ds.iter_rows()

    def stop(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _run_local(items: list[dict], stages: list[Stage]) -> Iterator[dict]:
    """Each stage built once here; a stage object's `close()`, if it has one, runs when the job ends (a Ray
    actor's resources go with its process; here they must be let go)."""
    fns = [s.fn(*s.args) if isinstance(s.fn, type) else _bind(s.fn, s.kwargs) for s in stages]
    try:
        for item in items:
            table = pa.Table.from_pylist([item])
            for fn in fns:
                out = fn(table)
                table = out if isinstance(out, pa.Table) else pa.table(out)
            yield from table.to_pylist()
    finally:
        for fn in fns:
            if hasattr(fn, "close"):
                fn.close()


def _bind(fn: Callable, kwargs: dict) -> Callable:
    return lambda table: fn(table, **kwargs)
