"""Typed cluster configs for `l2c submit`: the job's runtime environment and each stage's Ray resources.

`configs/ray/runtime_env.yaml` → `RuntimeEnvConfig` (what Ray ships or installs for the job);
`configs/ray/resources.yaml` → `ClusterResources` (where the job's driver runs, how many actors or workers
a stage starts and what each one holds). `stage_flags` turns a stage's resources into the command's own flags,
so a submitted command line says everything it runs with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from l2c.config import ConfigError, load_config
from l2c.ray_utils import valid_resources

RUNTIME_ENV = "ray/runtime_env.yaml"
RESOURCES = "ray/resources.yaml"


@dataclass
class RuntimeEnvConfig:
    """A Ray `runtime_env`: code to ship (a working dir or wheels) plus packages and env vars."""

    working_dir: str | None = None  # local dir (uploaded, size-limited) or a remote .zip URL
    py_modules: list[str] = field(default_factory=list)  # e.g. dist/l2c-0.1.0-py3-none-any.whl
    pip: list[str] = field(default_factory=list)  # installed per job on every node (needs the network)
    excludes: list[str] = field(default_factory=list)  # left out of the working_dir upload
    env_vars: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        for path in ([self.working_dir] if self.working_dir else []) + self.py_modules:
            if "://" not in path and not Path(path).exists():
                raise ConfigError(f"runtime env: {path} does not exist (relative paths start at the current dir)")
        bad = [k for k, v in self.env_vars.items() if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ConfigError(f"runtime env: env_vars {bad} must be plain values")

    def to_ray(self, extra_env: dict[str, str] | None = None) -> dict:
        """The dict `JobSubmissionClient.submit_job(runtime_env=...)` takes (local paths made absolute)."""

        def ref(p: str) -> str:
            return p if "://" in p else str(Path(p).resolve())

        env: dict = {}
        if self.working_dir:
            env["working_dir"] = ref(self.working_dir)
            if self.excludes:
                env["excludes"] = list(self.excludes)
        if self.py_modules:
            env["py_modules"] = [ref(p) for p in self.py_modules]
        if self.pip:
            env["pip"] = list(self.pip)
        env_vars = {k: str(v) for k, v in {**self.env_vars, **(extra_env or {})}.items()}
        if env_vars:
            env["env_vars"] = env_vars
        return env


@dataclass
class Entrypoint:
    """Resources reserved for the job's driver process (the l2c command itself)."""

    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict[str, int | float] = field(default_factory=dict)


@dataclass
class StageResources:
    """One command's resources. embed-captions: encoder actors (`workers`) and decode actors (`readers`);
    train-vision / finetune-text: Ray Train workers. Unset (null) keeps the command's own default."""

    entrypoint: Entrypoint = field(default_factory=Entrypoint)
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    worker_resources: dict[str, int | float] = field(default_factory=dict)
    readers: int | None = None

    def validate(self) -> None:
        for name in ("workers", "readers"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (or null for the command's default), got {v}")
        for name in ("gpus_per_worker", "cpus_per_worker"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0, got {v}")
        e = self.entrypoint
        for what, res in (("entrypoint.resources", e.resources), ("worker_resources", self.worker_resources)):
            if not valid_resources(res):
                raise ConfigError(f"{what} must map resource names to numbers >= 0, got {res}")
        if e.num_cpus < 0 or e.num_gpus < 0:
            raise ConfigError("entrypoint num_cpus / num_gpus must be >= 0")


@dataclass
class ClusterResources:
    """`configs/ray/resources.yaml`: one section per command that runs as a job."""

    embed_captions: StageResources = field(default_factory=StageResources)
    train_vision: StageResources = field(default_factory=StageResources)
    finetune_text: StageResources = field(default_factory=StageResources)
    eval_retrieval: StageResources = field(default_factory=StageResources)

    def validate(self) -> None:
        only_embed = ("cpus_per_worker", "worker_resources", "readers")
        for name in ("train_vision", "finetune_text", "eval_retrieval"):
            stage = getattr(self, name)
            used = [k for k in only_embed if getattr(stage, k)]
            if name == "eval_retrieval" and (stage.workers or stage.gpus_per_worker):
                used += ["workers/gpus_per_worker"]
            if name == "finetune_text" and stage.gpus_per_worker:
                used += ["gpus_per_worker (set dist.use_gpu in the finetune config)"]
            if used:
                raise ConfigError(f"{name}: {', '.join(used)} not used by this command (only its entrypoint is)")

    def stage(self, command: str) -> StageResources | None:
        return getattr(self, command.replace("-", "_"), None)


def load_runtime_env(path: str | Path | None = RUNTIME_ENV) -> RuntimeEnvConfig:
    return load_config(RuntimeEnvConfig, path) if path else RuntimeEnvConfig()


def load_resources(path: str | Path | None = RESOURCES) -> ClusterResources:
    return load_config(ClusterResources, path) if path else ClusterResources()


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def stage_flags(command: str, stage: StageResources, given: list[str]) -> list[str]:
    """The command's flags for `stage`'s settings, leaving out any flag already in `given` (those win)."""
    if command == "embed-captions":
        wanted = [("--num-actors", stage.workers), ("--gpus-per-actor", stage.gpus_per_worker),
                  ("--cpus-per-actor", stage.cpus_per_worker), ("--read-actors", stage.readers),
                  ("--actor-resources", json.dumps(stage.worker_resources) if stage.worker_resources else None)]  # fmt: skip
    elif command == "train-vision":
        wanted = [("--workers", stage.workers), ("--gpu", bool(stage.gpus_per_worker) or None)]
    elif command == "finetune-text":
        wanted = [("--num-workers", stage.workers)]
    else:
        wanted = []
    options = given[: given.index("--")] if "--" in given else given
    present = {a.split("=", 1)[0] for a in options if a.startswith("--")}
    out: list[str] = []
    for flag, value in wanted:
        if value is None or flag in present:
            continue
        out += [flag] if value is True else [flag, value if isinstance(value, str) else _num(value)]
    return out
