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
