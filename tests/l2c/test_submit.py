"""`l2c submit` without a cluster: command checks, configs → submission, clear errors; file:// storage paths;
the entrypoint's PATH-independent `l2c` and the one line for a job whose node cannot run l2c."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from l2c.apps.cluster import ClusterResources, load_resources, load_runtime_env
from l2c.apps.submit import RUN_L2C, SubmitError, build_submission, cannot_run_l2c, check_command, command_of
from l2c.cli import main
from l2c.config import ConfigError, load_config
from l2c.errors import L2CError
from l2c.pipeline.sources import expand_sources
from l2c.storage import Store
from tests.l2c.ray_cluster import free_port


def test_shipped_configs_load_and_map_to_flags():
    job = build_submission(["l2c", "embed-captions", "a.tar", "--out", "c", "--num-actors", "3"], None, None, [])
    assert job["entrypoint"].startswith(RUN_L2C)
    argv = shlex.split(command_of(job["entrypoint"]))
    # the config's gpus/cpus per actor are added; --num-actors from the command line wins over the config
    assert argv[:5] == ["l2c", "embed-captions", "a.tar", "--out", "c"]
    assert argv.count("--num-actors") == 1 and argv[argv.index("--num-actors") + 1] == "3"
    assert argv[argv.index("--gpus-per-actor") + 1] == "1" and argv[argv.index("--cpus-per-actor") + 1] == "2"
    assert job["entrypoint_num_cpus"] == 1 and job["entrypoint_num_gpus"] is None
    assert job["runtime_env"] == {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}}

    ev = build_submission(["l2c", "eval-retrieval", "--model", "m", "--images", "i.tar", "--text-cache", "c"],
                          None, None, [])  # fmt: skip
    assert ev["entrypoint_num_gpus"] == 1 and ev["entrypoint_num_cpus"] == 4
    tv = build_submission(["l2c", "train-vision", "--images", "i.tar", "--text-cache", "c", "--out", "r", "--",
                           "optim.lr=1e-4"], None, None, [])  # fmt: skip
    # flags go before `--`, config overrides stay after it
    assert shlex.split(command_of(tv["entrypoint"]))[-5:] == ["--workers", "8", "--gpu", "--", "optim.lr=1e-4"]


def test_runtime_env_and_resources_from_files(tmp_path):
    wheel = tmp_path / "l2c-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    renv = tmp_path / "env.yaml"
    renv.write_text(f"py_modules: [{wheel}]\nenv_vars: {{A: 1}}\npip: [pyyaml]\n")
    res = tmp_path / "res.yaml"
    res.write_text("embed_captions:\n  entrypoint: {num_cpus: 0.5, resources: {driver: 1}}\n  workers: 2\n"
                   "  gpus_per_worker: 0.5\n  worker_resources: {encode: 1}\n  readers: 3\n")  # fmt: skip
    job = build_submission(["l2c", "embed-captions", "a.tar", "--out", "c"], str(renv), str(res), ["B=x=y"])
    assert job["runtime_env"] == {"py_modules": [str(wheel)], "pip": ["pyyaml"], "env_vars": {"A": "1", "B": "x=y"}}
    assert job["entrypoint_num_cpus"] == 0.5 and job["entrypoint_resources"] == {"driver": 1}
    assert shlex.split(command_of(job["entrypoint"]))[5:] == ["--num-actors", "2", "--gpus-per-actor", "0.5", "--read-actors",
                                                  "3", "--actor-resources", '{"encode": 1}']  # fmt: skip
    check_command(shlex.split(command_of(job["entrypoint"])))  # the added flags are the command's own


@pytest.mark.parametrize(
    "yaml_text, message",
    [("embed_captions: {workerz: 2}", "unknown key"), ("embed_captions: {workers: 0}", ">= 1"),
     ("train_vision: {readers: 2}", "not used by this command"), ("eval_retrieval: {workers: 2}", "not used"),
     ("embed_captions: {worker_resources: {encode: many}}", "valid number"),
     ("embed_captions: {entrypoint: {num_gpus: -1}}", ">= 0")],
)  # fmt: skip
def test_bad_resources_config_is_refused(tmp_path, yaml_text, message):
    p = tmp_path / "res.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_resources(p)


def test_runtime_env_missing_path_is_refused(tmp_path):
    p = tmp_path / "env.yaml"
    p.write_text(f"working_dir: {tmp_path / 'nope'}\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_runtime_env(p)
    assert load_config(ClusterResources, None) == ClusterResources()


@pytest.mark.parametrize(
    "tokens, message",
    [([], "nothing to submit"), (["python", "x.py"], "runs l2c commands"), (["l2c"], "runs l2c commands"),
     (["l2c", "embed-capt", "a.tar"], "not an l2c command"), (["l2c", "submit", "--", "l2c", "version"], "not an l2c"),
     (["l2c", "embed-captions", "a.tar", "--outt", "c"], "No such option: --outt"),
     (["l2c", "train-vision", "--images", "a.tar"], "Missing option '--text-cache'"), (["l2c", "cache-info", "--help"], "runs nothing")],
)  # fmt: skip
def test_bad_command_lines(tokens, message):
    with pytest.raises(SubmitError, match=message) as e:
        check_command(tokens)
    assert isinstance(e.value, L2CError) and e.value.code == 2


def test_cli_errors_are_messages_with_exit_codes(capsys):
    assert main(["submit", "--dry-run"]) == 2
    assert main(["submit", "--dry-run", "--", "l2c", "embed-captions", "a.tar", "--out", "c", "--num-actor", "2"]) == 2
    assert main(["submit", "--env", "NOEQUALS", "--", "l2c", "version"]) == 2
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", "--address", url, "--", "l2c", "cache-info", "cache"]) == 3
    err = capsys.readouterr().err
    assert "nothing to submit" in err and "No such option: --num-actor" in err and "NOEQUALS" in err
    assert f"cannot reach the Ray Job API at {url}" in err and "Traceback" not in err


def test_dry_run_prints_the_submission(capsys):
    assert main(["submit", "--dry-run", "--", "l2c", "embed-captions", "a.tar", "--out", "file:///c"]) == 0
    out = capsys.readouterr().out
    assert "l2c embed-captions a.tar --out file:///c --gpus-per-actor 1 --cpus-per-actor 2\"," in out
    assert '"entrypoint": "command -v l2c >/dev/null || l2c() {' in out


def test_file_urls_are_local_paths(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text("")
    assert expand_sources([f"file://{tmp_path}/a.tar", f"file://{tmp_path}/*.jsonl", str(tmp_path / "a.tar")]) == [
        str(tmp_path / "a.tar"), str(tmp_path / "b.jsonl")]  # fmt: skip
    assert Store(f"file://{tmp_path}/cache").url == str(tmp_path / "cache")
    assert Store(Path(f"file://{tmp_path}/cache")).url == str(tmp_path / "cache")  # as a typer Path option gives it


def run_as_a_job(command: str, path: str, python_worker_command: str | None) -> subprocess.CompletedProcess:
    """Run `RUN_L2C + command` the way a Ray node does: `/bin/sh -c` whose parent (the job's supervisor) is a
    child of the raylet, whose command line carries `--python_worker_command=PYTHON ...` (here: a stand-in)."""
    supervisor = f"import subprocess, sys; sys.exit(subprocess.call(['/bin/sh', '-c', {RUN_L2C + command!r}]))"
    raylet = ["-c", "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1]]))",
              supervisor] + ([f"--python_worker_command={python_worker_command} -u default_worker.py"]
                             if python_worker_command else [])  # fmt: skip
    env = {**os.environ, "PATH": path}
    return subprocess.run([sys.executable, *raylet], env=env, capture_output=True, text=True, timeout=120)


def test_entrypoint_runs_l2c_without_it_on_path(tmp_path):
    """No `l2c` on PATH: the node's Ray python runs `python -m l2c.cli`; with none, one line and exit 127."""
    bare_path = "/usr/bin:/bin"
    assert subprocess.run(["/bin/sh", "-c", "command -v l2c"], env={"PATH": bare_path}).returncode != 0
    ok = run_as_a_job("l2c version", bare_path, sys.executable)
    assert (ok.returncode, ok.stdout) == (0, "0.1.0\n"), ok.stderr
    assert f"l2c: not on this node's PATH; running {sys.executable} -m l2c.cli" in ok.stderr
    none = run_as_a_job("l2c version", bare_path, None)
    assert none.returncode == 127 and none.stdout == ""
    assert none.stderr == "l2c: not found: not on this node's PATH, and no python of its Ray to run it\n"
    on_path = tmp_path / "bin"
    on_path.mkdir()
    (on_path / "l2c").write_text("#!/bin/sh\necho on-path \"$@\"\n")
    (on_path / "l2c").chmod(0o755)
    first = run_as_a_job("l2c version", f"{on_path}:{bare_path}", sys.executable)  # l2c on PATH comes first
    assert (first.returncode, first.stdout, first.stderr) == (0, "on-path version\n", "")


def job_details(message: str, code: int):
    from ray.job_submission import JobDetails, JobStatus, JobType

    return JobDetails(type=JobType.SUBMISSION, entrypoint=RUN_L2C + "l2c version", status=JobStatus.FAILED,
                      message=message, driver_exit_code=code, driver_agent_http_address="http://10.0.0.7:52365")  # fmt: skip


def test_a_job_that_cannot_run_l2c_says_why():
    head = "Job entrypoint command failed with exit code {}, last available logs (truncated to 20,000 chars):\n"
    no_module = ("l2c: not on this node's PATH; running /opt/ray/bin/python -m l2c.cli\n/opt/ray/bin/python: Error "
                 "while finding module specification for 'l2c.cli' (ModuleNotFoundError: No module named 'l2c')\n")  # fmt: skip
    line = cannot_run_l2c(job_details(head.format(1) + no_module, 1))
    assert line.startswith("the cluster cannot run l2c: on node 10.0.0.7 l2c is not installed for the python "
                           "that runs there (/opt/ray/bin/python). Every node needs l2c 0.1.0 installed")  # fmt: skip
    assert "\n" not in line and "docker image" in line and "py_modules" in line and "docs/cluster.md" in line
    assert "cannot be found" in cannot_run_l2c(job_details(head.format(127) + "/bin/sh: 1: l2c: not found\n", 127))
    old = cannot_run_l2c(job_details(head.format(1) + "ModuleNotFoundError: No module named 'l2c.storage'\n", 1))
    assert "on a node l2c has no module l2c.storage (l2c there is not version 0.1.0" in old
    actor = cannot_run_l2c(job_details(head.format(1) + "ray.exceptions.RayActorError: ... No module named 'l2c'\n", 1))
    assert actor.startswith("the cluster cannot run l2c: on a node l2c is not installed (a task or actor there")
    # a job that ran l2c and failed on its own gets no such line
    assert cannot_run_l2c(job_details(head.format(1) + "l2c: a.tar does not exist\n", 1)) is None
    assert cannot_run_l2c(job_details(head.format(2) + "No module named 'yaml'\n", 2)) is None
