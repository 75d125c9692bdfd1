"""Starting or joining Ray: a private local instance by default, a cluster with `--ray-address`/`RAY_ADDRESS`."""

from __future__ import annotations

import os
import tempfile


def valid_resources(resources: dict | None) -> bool:
    """A Ray resource map: names to plain numbers >= 0 (bools are not numbers here)."""
    return all(not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0 for v in (resources or {}).values())


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Join the cluster at `address` (or `RAY_ADDRESS`); else start a fresh local Ray in a temp dir.

    Returns True when this call started Ray (the caller then owns `ray.shutdown()`).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled") if not address else None
    kwargs = {"log_to_driver": not quiet, "include_dashboard": False, "configure_logging": not quiet}
    if address:
        ray.init(address=address, **kwargs)
    else:
        tmp = tempfile.mkdtemp(prefix="l2c-ray-", dir="/tmp")
        # Ray starts its workers at nice 15 by default; here they do the job's work, so they keep the priority
        # the command was started with (anything else on the machine would otherwise starve them).
        ray.init(address="local", num_cpus=num_cpus, _temp_dir=tmp, _system_config={"worker_niceness": 0}, **kwargs)
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    if quiet:
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return True
