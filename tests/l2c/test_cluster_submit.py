"""`l2c submit` against a real two-node Ray cluster on this machine (separate `ray start` processes).

The head holds the job drivers (`driver` resource), the worker node the encoder actor (`encode` resource), so
the embed job is split across nodes. The head is started as a new user would: `.venv/bin/ray start` from a
shell where the venv is not activated (no `l2c` on its PATH), so the jobs run `l2c` with the python of the
node's Ray. One embed job loses its worker node mid-job; after a replacement node joins, the rerun completes
the cache, which then equals a single-process encoding of the same captions. A last node whose Ray runs from
a Python without l2c gets a job that cannot start: one line says why.
"""

import json
import re
import shutil
import time

import numpy as np
import pytest
import yaml

from l2c.apps.submit import command_of
from l2c.cache import TextCache, embedding_matrix
from l2c.cli import main
from tests.l2c.ray_cluster import LocalCluster, ray_without_l2c
from tests.pipeline.conftest import caption_shards

pytestmark = pytest.mark.slow
FIELDS = ["txt", "json:long_caption"]
N_SHARDS = 10
PER_SHARD = 32


def add_worker(c: LocalCluster) -> None:
    known = {n.node_id for n in c.alive_nodes()}
    c.worker = c.add_node(num_cpus=2, resources={"encode": 1})
    c.worker_id = next(n.node_id for n in c.alive_nodes() if n.node_id not in known)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        c = LocalCluster()
        try:
            c.start_head(num_cpus=4, resources={"driver": 1}, l2c_on_path=False)
            add_worker(c)
            yield c
        finally:
            c.shutdown()
            left = c.leftover_pids()
            shutil.rmtree(c.temp_dir, ignore_errors=True)
            assert left == [], f"ray processes left running: {left}"


@pytest.fixture(scope="module")
def submit_args(cluster, tmp_path_factory):
    res = tmp_path_factory.mktemp("cfg") / "resources.yaml"
    res.write_text(yaml.safe_dump({"embed_captions": {
        "entrypoint": {"num_cpus": 1, "resources": {"driver": 1}}, "workers": 1, "gpus_per_worker": 0,
        "cpus_per_worker": 1, "worker_resources": {"encode": 1}, "readers": 1}}))  # fmt: skip
    return ["submit", "--address", cluster.dashboard, "--resources", str(res), "--env", "HF_HUB_OFFLINE=1"]


def embed_cmd(shards, out) -> list[str]:
    srcs = [f"file://{s}" for s in shards]
    fields = [a for f in FIELDS for a in ("-f", f)]
    return ["--", "l2c", "embed-captions", *srcs, "--out", f"file://{out}", *fields, "--store-dtype", "float32",
            "--no-progress"]  # fmt: skip


def test_failed_job_gives_nonzero_exit_and_reason(cluster, submit_args, tmp_path, capsys):
    rc = main(submit_args + ["--", "l2c", "embed-captions", f"file://{tmp_path}/missing.tar", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "does not exist" in captured.out  # the job's own error, streamed from its logs
    assert "l2c: not on this node's PATH; running " in captured.out  # the head's Ray python ran it
    assert "cannot run l2c" not in captured.err
    # the command's own exit status (2: bad input, in l2c's error model), reported by Ray
    assert re.search(r"FAILED: Job entrypoint command failed with exit code [12],", captured.err)


def wait_until(pred, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def manifest_shards(out) -> dict:
    from l2c.cache import Manifest

    return Manifest.load(out).to_dict()["shards"] if (out / "manifest.json").exists() else {}


def test_node_lost_mid_job_then_rerun_completes_equal_to_single_process(cluster, submit_args, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    shards = caption_shards(tmp_path / "src", n_shards=N_SHARDS, per_shard=PER_SHARD)
    out = tmp_path / "cache"
    client = JobSubmissionClient(cluster.dashboard)

    assert main(submit_args + ["--no-wait"] + embed_cmd(shards, out)) == 0
    job_id = capsys.readouterr().out.strip()
    assert command_of(client.get_job_info(job_id).entrypoint).startswith("l2c embed-captions file://")

    def started() -> bool:
        assert not client.get_job_status(job_id).is_terminal(), client.get_job_logs(job_id)[-3000:]
        return bool(manifest_shards(out))

    wait_until(started, 240, "the first shard", poll=0.05)
    cluster.kill_node(cluster.worker)  # the node is lost with its actor and whatever it held
    worker_id = cluster.worker_id

    # work was split: the driver ran on the head, the encoder actor on the lost worker node
    encoders = [a for a in list_actors(address=cluster.dashboard, raise_on_missing_output=False)
                if "EncodeShard" in a.class_name]  # fmt: skip
    assert {a.node_id for a in encoders} == {worker_id}
    assert client.get_job_info(job_id).driver_node_id != worker_id

    wait_until(lambda: len(cluster.alive_nodes()) == 1, 60, "the cluster to notice the lost node")
    # nothing can encode now: the job waits for a node that can host its encoder (or fails); stop it
    assert client.get_job_status(job_id) != JobStatus.SUCCEEDED
    client.stop_job(job_id)
    wait_until(lambda: client.get_job_status(job_id).is_terminal(), 60, "the job to stop")
    before = manifest_shards(out)
    assert 1 <= len(before) < N_SHARDS
    mtimes = {name: (out / e["file"]).stat().st_mtime_ns for name, e in before.items()}

    add_worker(cluster)  # the replacement node
    capsys.readouterr()
    assert main(submit_args + embed_cmd(shards, out)) == 0
    logs = capsys.readouterr().out
    assert f"{N_SHARDS - len(before)} / {len(before)} / {N_SHARDS}" in logs  # written / skipped / total

    cache = TextCache(out)
    assert cache.validate() == [] and sorted(cache.shard_names) == [s.stem for s in shards]
    assert {n: (out / e["file"]).stat().st_mtime_ns for n, e in before.items()} == mtimes  # finished: kept
    assert not list(out.glob(".tmp-*"))
    keys, flds, _ = cache.load()
    assert len(keys) == N_SHARDS * PER_SHARD * len(FIELDS) == len(set(zip(keys, flds, strict=True)))  # none lost or doubled
    assert_equals_single_process(cache, shards)


def assert_equals_single_process(cache, shards):
    """Every shard's rows equal one in-process forward pass of the same model over the same captions."""
    import webdataset as wds

    from l2c.models import resolve_model
    from l2c.pipeline.encoder import TextEncoder

    enc = TextEncoder.load(resolve_model("minilm"), dtype="float32")
    for tar in shards:
        rows = []
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            rows += [(s["__key__"], "txt", s["txt"].decode()),
                     (s["__key__"], "json:long_caption", json.loads(s["json"])["long_caption"])]  # fmt: skip
        table = cache.read_shard(tar.stem)
        assert list(zip(table["key"].to_pylist(), table["field"].to_pylist(), strict=True)) == [r[:2] for r in rows]
        texts = [r[2] for r in rows]
        np.testing.assert_allclose(embedding_matrix(table), enc.encode(texts), atol=2e-5)
        assert table["n_tokens"].to_pylist() == [len(x) for x in enc.captions(texts).ids]
    assert cache.settings["model"] == "minilm" and cache.settings["store_dtype"] == "float32"



def test_job_writes_its_cache_to_an_object_store(cluster, submit_args, s3_server, s3_bucket, tmp_path, capsys):
    """Credentials and endpoint travel in the job's runtime env (`--env`); the cache lands in the bucket."""
    shards = caption_shards(tmp_path / "src", n_shards=3, per_shard=8)
    out = f"{s3_bucket}/cache"
    env = [a for k, v in s3_server.items() for a in ("--env", f"{k}={v}")]
    cmd = embed_cmd(shards, tmp_path / "unused")
    cmd[cmd.index("--out") + 1] = out
    assert main(submit_args + env + cmd) == 0
    assert "3 / 0 / 3" in capsys.readouterr().out  # written / skipped / total
    cache = TextCache(out)
    assert cache.validate() == [] and cache.dir == out
    assert_equals_single_process(cache, shards)


def test_node_that_cannot_run_l2c_says_why(cluster, tmp_path, capsys):
    """A node whose Ray runs from a Python without l2c and has no `l2c` on PATH (as a stock Ray image): the job
    placed there ends with one line saying the node cannot run l2c and how to fix it, and exit 1."""
    env = tmp_path / "ray-env"
    ray = ray_without_l2c(env)
    n = len(cluster.alive_nodes())
    node = cluster.add_node(num_cpus=1, resources={"bare": 1}, ray=ray, l2c_on_path=False)
    try:
        res = tmp_path / "resources.yaml"
        res.write_text(yaml.safe_dump({"embed_captions": {"entrypoint": {"num_cpus": 0, "resources": {"bare": 1}}}}))
        capsys.readouterr()
        rc = main(["submit", "--address", cluster.dashboard, "--resources", str(res), "--", "l2c", "embed-captions",
                   f"file://{tmp_path}/a.tar", "--out", str(tmp_path / "cache")])  # fmt: skip
        captured = capsys.readouterr()
    finally:
        cluster.kill_node(node)
        wait_until(lambda: len(cluster.alive_nodes()) == n, 60, "the cluster to notice the node is gone")
    assert rc == 1
    assert f"running {env}/bin/python -m l2c.cli" in captured.out and "No module named 'l2c'" in captured.out
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1, captured.err
    assert re.fullmatch(rf"l2c: error: the cluster cannot run l2c: on node [\d.]+ l2c is not installed for the python "
                        rf"that runs there \({env}/bin/python\)\. Every node needs l2c 0\.1\.0 installed .*", errors[0])  # fmt: skip
    assert "docker image" in errors[0] and "runtime env (py_modules" in errors[0] and "docs/cluster.md" in errors[0]
