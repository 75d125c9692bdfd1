"""`l2c submit` without a cluster: command checks, configs → submission, clear errors; file:// storage paths."""

import shlex
from pathlib import Path

import pytest

from l2c.cli import main
from l2c.cluster import ClusterResources, load_resources, load_runtime_env
from l2c.config import ConfigError, load_config
from l2c.pipeline.sources import expand_sources
from l2c.storage import Store
from l2c.submit import SubmitError, build_submission, check_command
from tests.l2c.ray_cluster import free_port


def test_shipped_configs_load_and_map_to_flags():
    job = build_submission(["l2c", "embed-captions", "a.tar", "--out", "c", "--num-actors", "3"], None, None, [])
    argv = shlex.split(job["entrypoint"])
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
    assert shlex.split(tv["entrypoint"])[-5:] == ["--workers", "8", "--gpu", "--", "optim.lr=1e-4"]


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
    assert shlex.split(job["entrypoint"])[5:] == ["--num-actors", "2", "--gpus-per-actor", "0.5", "--read-actors",
                                                  "3", "--actor-resources", '{"encode": 1}']  # fmt: skip
    check_command(shlex.split(job["entrypoint"]))  # the added flags are the command's own


@pytest.mark.parametrize(
    "yaml_text, message",
    [("embed_captions: {workerz: 2}", "unknown key"), ("embed_captions: {workers: 0}", ">= 1"),
     ("train_vision: {readers: 2}", "not used by this command"), ("eval_retrieval: {workers: 2}", "not used"),
     ("embed_captions: {worker_resources: {encode: many}}", "numbers"),
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
     (["l2c", "embed-captions", "a.tar"], "Missing option '--out'"), (["l2c", "cache-info", "--help"], "runs nothing")],
)  # fmt: skip
def test_bad_command_lines(tokens, message):
    with pytest.raises(SubmitError, match=message):
        check_command(tokens)


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
    assert '"entrypoint": "l2c embed-captions a.tar --out file:///c --gpus-per-actor 1 --cpus-per-actor 2"' in out


def test_file_urls_are_local_paths(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text("")
    assert expand_sources([f"file://{tmp_path}/a.tar", f"file://{tmp_path}/*.jsonl", str(tmp_path / "a.tar")]) == [
        str(tmp_path / "a.tar"), str(tmp_path / "b.jsonl")]  # fmt: skip
    assert Store(f"file://{tmp_path}/cache").url == str(tmp_path / "cache")
    assert Store(Path(f"file://{tmp_path}/cache")).url == str(tmp_path / "cache")  # as a typer Path option gives it
