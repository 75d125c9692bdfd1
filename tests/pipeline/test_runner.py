"""The runner: embed stages in this process or as a Ray Data job give the same cache; `auto` picks the process
only for one encoder on this machine with no Ray addressed or running; Ray-only settings are refused locally."""

import os
import subprocess

import numpy as np
import pytest

from l2c.cache import TextCache, embedding_matrix
from l2c.cli import main
from l2c.pipeline.embed_job import EmbedConfig, run_embed
from tests.pipeline.conftest import caption_shards, l2c_cli

FIELDS = ["txt", "json:long_caption"]


def embed(sources, out, **kw):
    return run_embed(EmbedConfig(sources=[str(s) for s in sources], out=str(out), text_fields=FIELDS, progress=False,
                                 store_dtype="float32", **kw))  # fmt: skip


def test_local_and_ray_runners_write_the_same_cache(ray_local, tmp_path, minilm_path):
    import torch

    shards = caption_shards(tmp_path / "src", n_shards=3, per_shard=5)
    threads = torch.get_num_threads()
    local = embed(shards, tmp_path / "local", model=str(minilm_path), runner="local")
    assert torch.get_num_threads() == threads  # the process gets its torch threads back
    ray = embed(shards, tmp_path / "ray", model=str(minilm_path), runner="ray")
    auto = embed(shards, tmp_path / "auto", model=str(minilm_path))  # Ray runs in this process: auto joins it
    assert (local["runner"], ray["runner"], auto["runner"]) == ("local", "ray", "ray")
    assert local["rows"] == ray["rows"] == 3 * 5 * 2 and local["tokens_written"] == ray["tokens_written"]
    a, b = TextCache(tmp_path / "local"), TextCache(tmp_path / "ray")
    assert a.validate() == [] and b.validate() == []
    assert a.manifest.to_dict()["shards"] == b.manifest.to_dict()["shards"]  # same files, rows and sha256
    for name in a.shard_names:
        assert np.array_equal(embedding_matrix(a.read_shard(name)), embedding_matrix(b.read_shard(name)))
    again = embed(shards, tmp_path / "local", model=str(minilm_path), runner="local")  # resumes like Ray's
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0


def test_auto_runs_in_the_process_when_no_ray_is_addressed(tmp_path, minilm_path):
    shards = caption_shards(tmp_path / "src", n_shards=2, per_shard=3)
    out = tmp_path / "cache"
    cmd = [*l2c_cli(), "embed-captions", *map(str, shards), "--out", str(out), "--model", str(minilm_path),
           "-f", "txt", "--no-progress"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "in this process" in done.stdout and len(TextCache(out)) == 2 * 3


@pytest.mark.parametrize("flags, says", [
    (["--runner", "local", "--num-actors", "2"], "--num-actors need --runner ray"),
    (["--runner", "local", "--read-actors", "1"], "--read-actors need --runner ray"),
    (["--runner", "local", "--ray-address", "ray://head:10001"], "--ray-address need --runner ray"),
    (["--runner", "threads"], "--runner must be one of auto, local, ray"),
])  # fmt: skip
def test_runner_refusals_are_one_line(tmp_path, capsys, flags, says):
    shards = caption_shards(tmp_path / "src", n_shards=1, per_shard=2)
    assert main(["embed-captions", str(shards[0]), "--out", str(tmp_path / "c"), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_layouts_auto_chooses_between():
    """What `auto` would run in the process (one fused CPU encoder) and what it leaves to Ray."""
    from l2c.pipeline.embed_job import layout

    cfg = EmbedConfig(sources=["x"], out="y")
    cpu = layout(cfg, gpus=0, cpus=2)
    assert (cpu["n_actors"], cpu["threads"], cpu["cpus_per"], cpu["fused"]) == (1, 2, 1.0, True)
    gpu = layout(cfg, gpus=8, cpus=64)
    assert (gpu["on_gpu"], gpu["n_actors"], gpu["threads"], gpu["n_readers"], gpu["fused"]) == (True, 8, None, 4, False)
    assert layout(cfg, gpus=8, cpus=64, local=True)["n_actors"] == 1  # --runner local: one encoder, this process
    assert not layout(EmbedConfig(sources=["x"], out="y", read_actors=2), gpus=0, cpus=2)["fused"]
    assert not layout(EmbedConfig(sources=["x"], out="y", num_actors=2), gpus=0, cpus=16)["fused"]
    cpu_on_gpu_box = layout(EmbedConfig(sources=["x"], out="y", gpus_per_actor=0), gpus=8, cpus=16)
    assert (cpu_on_gpu_box["on_gpu"], cpu_on_gpu_box["threads"], cpu_on_gpu_box["fused"]) == (False, 16, True)


def test_local_runner_refuses_a_cluster_named_by_the_environment(tmp_path, monkeypatch):
    from l2c.config import ConfigError

    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ConfigError, match="--ray-address need --runner ray"):
        embed([tmp_path / "x.jsonl"], tmp_path / "c", runner="local")
    assert not (tmp_path / "c").exists()  # refused before anything is written
