"""`l2c submit`: run an l2c command as a Ray job through the Job Submission API, follow its logs.

    l2c submit --address http://HEAD:8265 -- l2c embed-captions 's3://bucket/shard-{000..099}.tar' --out /fsx/cache

The command line is parsed here first (a typo fails before anything reaches the cluster); the stage's section
of `configs/ray/resources.yaml` adds its flags (flags given on the command line win) and reserves the driver's
resources; `configs/ray/runtime_env.yaml` becomes the job's runtime environment.
The job's entrypoint runs `l2c` from the node's PATH or, where there is none, `python -m l2c.cli` with the
python that runs Ray on that node (`RUN_L2C`), so nodes started from a venv that is not activated run it too;
a job that still cannot run l2c ends with one line that says so and how to fix it (`cannot_run_l2c`).
Exit codes: 0 the job succeeded (or was submitted, with --no-wait), 1 it failed or was stopped,
2 bad input (command line, configs, refused by the cluster), 3 the cluster cannot be reached.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from pathlib import Path
from typing import NamedTuple

import typer

from l2c import __version__
from l2c.config import CONFIG_DIR, ConfigError
from l2c.errors import EXIT_FAILED, EXIT_USAGE, JobFailed, L2CError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXIT_UNREACHABLE = 3

# Ray runs a job's entrypoint with /bin/sh on the node that holds the driver, with that node's environment.
# Where `l2c` is not on the node's PATH (e.g. `.venv/bin/ray start` from a venv that is not activated), this
# defines a shell function `l2c` that runs `python -m l2c.cli` with the python that runs Ray on the node: the
# raylet starts its Python workers, the job's supervisor among them (this shell's parent), with
# `--python_worker_command=PYTHON ...`, read from the raylet's command line (Linux /proc). A runtime env's
# `py_modules` / `working_dir` reach that python through PYTHONPATH; its `pip` / `conda` env is activated
# (its bin on PATH), so its own `l2c` is found first.
RUN_L2C = (
    "command -v l2c >/dev/null || l2c() { "
    r"""p=$(tr '\0' '\n' 2>/dev/null </proc/$(sed 's/.*) [^ ]* //;s/ .*//' /proc/$PPID/stat 2>/dev/null)/cmdline"""
    r""" | sed -n 's/^--python_worker_command=\([^ ]*\).*/\1/p'); """
    """[ -x "$p" ] || { echo "l2c: not found: not on this node's PATH, and no python of its Ray to run it" >&2; """
    """exit 127; }; echo "l2c: not on this node's PATH; running $p -m l2c.cli" >&2; exec "$p" -m l2c.cli "$@"; }; """
)


class SubmitError(L2CError):
    """A submission that cannot be made; `code` is the exit status (2 by default, 3: cluster unreachable)."""

    code = EXIT_USAGE


class Command(NamedTuple):
    name: str
    args: list[str]
    params: dict  # the values the command would run with, as its own parser reads them


def check_command(tokens: list[str]) -> Command:
    """Parse `["l2c", CMD, *args]` with CMD's own options and arguments, without running it."""
    from l2c.cli import app

    if not tokens:
        raise SubmitError("nothing to submit: put the command after `--`, e.g. l2c submit -- l2c embed-captions SRC --out DIR")
    if tokens[0] != "l2c" or len(tokens) < 2:
        raise SubmitError(f"l2c submit runs l2c commands: expected `-- l2c COMMAND ...`, got {shlex.join(tokens)!r}")
    group = typer.main.get_command(app)
    name, args = tokens[1], list(tokens[2:])
    cmd = group.commands.get(name)
    if cmd is None or name == "submit":
        known = ", ".join(sorted(c for c in group.commands if c != "submit"))
        raise SubmitError(f"`{name}` is not an l2c command that can run as a job; commands: {known}")
    if "--help" in (args[: args.index("--")] if "--" in args else args):
        raise SubmitError(f"`l2c {name} --help` runs nothing; see it here with `l2c {name} --help`")
    try:
        ctx = cmd.make_context(f"l2c {name}", list(args))
    except Exception as e:  # typer's (vendored) click reports bad arguments as UsageError
        if not hasattr(e, "format_message"):
            raise
        raise SubmitError(f"`l2c {name}`: {e.format_message()}") from e
    return Command(name, args, dict(ctx.params))


def _default_config(name: str) -> Path | None:
    p = CONFIG_DIR / name
    return p if p.exists() else None


def build_submission(tokens: list[str], runtime_env: str | None, resources: str | None, env: list[str]) -> dict:
    """The keyword arguments of `JobSubmissionClient.submit_job` for this command line and these configs."""
    from l2c.apps.cluster import RESOURCES, RUNTIME_ENV, load_resources, load_runtime_env, stage_flags

    name, args, _ = check_command(tokens)
    extra_env = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r} is not KEY=VALUE")
        extra_env[key] = value
    try:
        renv = load_runtime_env(runtime_env or _default_config(RUNTIME_ENV))
        res = load_resources(resources or _default_config(RESOURCES))
    except (ConfigError, OSError) as e:
        raise SubmitError(f"config: {e}") from e
    stage = res.stage(name)
    if stage is not None:
        split = args.index("--") if "--" in args else len(args)
        args = args[:split] + stage_flags(name, stage, args) + args[split:]
        check_command(["l2c", name, *args])
    entry = stage.entrypoint if stage is not None else None
    return {
        "entrypoint": RUN_L2C + shlex.join(["l2c", name, *args]),
        "runtime_env": renv.to_ray(extra_env) or None,
        "entrypoint_num_cpus": entry.num_cpus if entry else None,
        "entrypoint_num_gpus": (entry.num_gpus or None) if entry else None,
        "entrypoint_resources": (dict(entry.resources) or None) if entry else None,
    }


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`, or SubmitError (exit 3) when it cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(
            f"cannot reach the Ray Job API at {address}: {e}\n"
            "Give the head node's dashboard address (port 8265) with --address or RAY_API_SERVER_ADDRESS.",
            EXIT_UNREACHABLE,
        ) from e


def command_of(entrypoint: str) -> str:
    """The l2c command line of a job's entrypoint (without the `RUN_L2C` prefix)."""
    return entrypoint.removeprefix(RUN_L2C)


_NO_MODULE = re.compile(r"No module named '(l2c[\w.]*)'")
_NO_SPEC = re.compile(r"(\S+): Error while finding module specification for 'l2c\.cli'")


def cannot_run_l2c(info) -> str | None:
    """One line for a failed job whose node could not run l2c (exit 127, l2c not found or not importable), else None.

    `info` is the job's `JobDetails` (its `message` ends with the last lines of the job's log)."""
    log = info.message or ""
    missing = _NO_MODULE.search(log)
    if getattr(info, "driver_exit_code", None) != 127 and not missing:
        return None
    # the driver's node when the entrypoint itself could not start l2c; else a task or actor somewhere failed to
    driver = (getattr(info, "driver_agent_http_address", None) or "").split("//")[-1].rsplit(":", 1)[0]
    py = _NO_SPEC.search(log)
    at_driver = bool(driver) and (py is not None or not missing)
    where = f"node {driver}" if at_driver else "a node"
    if missing and missing.group(1) != "l2c":
        why = f"l2c has no module {missing.group(1)} (l2c there is not version {__version__}, as here)"
    elif py:
        why = f"l2c is not installed for the python that runs there ({py.group(1)})"
    elif missing:
        why = "l2c is not installed (a task or actor there could not import it)"
    else:
        why = "`l2c` is not on its PATH and the python that runs Ray there cannot be found"
    return (
        f"the cluster cannot run l2c: on {where} {why}. Every node needs l2c {__version__} installed in the "
        "environment its `ray start` runs from (start the nodes from that venv, or use the l2c docker image), "
        "or ship it with the job's runtime env (py_modules: [dist/l2c-*.whl] in configs/ray/runtime_env.yaml); "
        "see docs/cluster.md"
    )


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        typer.echo(chunk, nl=False)


def wait_for(client, job_id: str) -> int:
    """Stream the job's logs until it ends; returns its exit code (0 when it succeeded), or raises JobFailed
    with one line on what to fix when the job's node could not run l2c."""
    from ray.job_submission import JobStatus

    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        typer.secho(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id})", err=True)
        return 130
    except Exception as e:  # the log stream broke (network): keep waiting on the status instead
        typer.secho(f"log stream of job {job_id} ended early ({type(e).__name__}: {e}); waiting for its status", err=True)
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status settles
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    ok = status == JobStatus.SUCCEEDED
    reason = "" if ok else f": {(info.message or '').splitlines()[0] if info.message else 'no message'}"
    typer.secho(f"job {job_id}: {status.value}{reason}", fg="green" if ok else "red", err=True)
    hint = None if ok else cannot_run_l2c(info)
    if hint:
        raise JobFailed(hint)
    return 0 if ok else EXIT_FAILED


def submit(
    command: list[str] = typer.Argument(None, help="the l2c command line, after `--`"),
    address: str = typer.Option(DEFAULT_ADDRESS, "--address", envvar="RAY_API_SERVER_ADDRESS",
                                help="Ray dashboard (Job API) address of the cluster's head node"),  # fmt: skip
    runtime_env: str = typer.Option(None, "--runtime-env", help="runtime env config (default configs/ray/runtime_env.yaml)"),
    resources: str = typer.Option(None, "--resources", help="stage resources (default configs/ray/resources.yaml)"),
    env: list[str] = typer.Option(None, "--env", help="KEY=VALUE for the job's environment (repeatable)"),
    job_id: str = typer.Option(None, "--job-id", help="submission id (default: one Ray picks)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the logs and exit with the job's status, or print the job id"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be submitted; submit nothing"),
) -> int:
    """Run an l2c command as a Ray job on a cluster: `l2c submit [--address URL] -- l2c COMMAND ...`."""
    import json

    # a SubmitError (or JobFailed) ends the command with its one line and exit code (l2c.cli's L2CError handler)
    job = build_submission(list(command or []), runtime_env, resources, list(env or []))
    if dry_run:
        typer.echo(json.dumps(job, indent=2))
        return 0
    client = connect(address)
    try:
        jid = client.submit_job(**job, submission_id=job_id)
    except RuntimeError as e:
        raise SubmitError(f"the cluster refused the job: {e}") from e
    if not wait:
        typer.echo(jid)
        return 0
    typer.secho(f"job {jid} submitted to {address}: {command_of(job['entrypoint'])}", err=True)
    code = wait_for(client, jid)
    if code:
        raise typer.Exit(code)
    return 0


def register(app: typer.Typer) -> None:
    app.command("submit", context_settings={"allow_interspersed_args": False})(submit)
