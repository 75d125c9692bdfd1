"""Shared fixtures: real data beside the checkout, a private local Ray, tiny models saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("L2C_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="L2C_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole test session (2 CPUs), shut down at the end."""
    import ray

    from l2c.ray_utils import init_ray

    started = init_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from l2c.models import resolve_model

    return resolve_model("minilm")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's standalone server) on loopback, as its own process.

    Yields the environment a client needs (endpoint, dummy credentials): tests set it with monkeypatch, and
    subprocesses (a CLI run with its own Ray) get it in `env=`.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto.server", reason="needs the dev extra (moto[server]) for the S3 server")
    pytest.importorskip("s3fs", reason="needs s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the S3 server did not start on {endpoint}")
            time.sleep(0.2)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "l2c-test",
        "AWS_SECRET_ACCESS_KEY": "l2c-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield env
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """A fresh bucket on the test S3 server, with this process's environment pointing at it: `s3://NAME`."""
    import re

    import fsspec
    import s3fs

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-bkt"
    fsspec.filesystem("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def refused(capsys):
    """`refused(argv, pattern)`: the l2c command exits 2 with `pattern` in its message and no traceback;
    an input error (not a usage error) is exactly one line."""
    import re

    from l2c.cli import main

    def check(argv: list[str], pattern: str) -> str:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2, (rc, err)
        assert "Traceback" not in err and re.search(pattern, err.replace("\n", " ")), err
        if err.startswith("l2c: error:"):
            assert len(err.strip().splitlines()) == 1, err
        return err

    return check
