"""A real multi-node Ray cluster on this machine: a head and worker nodes as separate `ray start` processes.

Every node is `ray start --block` in its own process group, with its own ports and a shared temp dir, so a
node can be lost on purpose (SIGKILL to its group) and everything is torn down by process id at the end.
Nodes run with the venv's bin first on PATH, as in the cluster image, so a job's `l2c` entrypoint resolves.
Clients reach the head on 127.0.0.1; Ray itself registers the nodes under the host's own address.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        # notice a lost node within ~3 s instead of ~30 s
        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3", RAY_health_check_timeout_ms="1000",
    )  # fmt: skip
    return env


class LocalCluster:
    """Head + worker nodes on this machine. `dashboard` is the Job API address for `l2c submit --address`."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="l2c-rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        self.nodes: list[subprocess.Popen] = []
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self._worker_port = 20000 + (os.getpid() % 50) * 200  # 100-port worker ranges, away from Ray's defaults

    def _start(self, args: list[str], num_cpus: int, resources: dict) -> subprocess.Popen:
        lo, self._worker_port = self._worker_port, self._worker_port + 100
        cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--num-gpus", "0", "--resources", json.dumps(resources), "--temp-dir", self.temp_dir,
               "--min-worker-port", str(lo), "--max-worker-port", str(lo + 99),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--disable-usage-stats", "--object-store-memory", str(300 * 2**20), *args]  # fmt: skip
        with open(Path(self.temp_dir) / f"node-{len(self.nodes)}.log", "wb") as log:  # the child keeps its own fd
            proc = subprocess.Popen(cmd, env=node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: int, resources: dict) -> subprocess.Popen:
        port = self.gcs.rsplit(":", 1)[1]
        head = self._start(["--head", "--port", port, "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", self.dashboard.rsplit(":", 1)[1],
                            "--ray-client-server-port", str(free_port())], num_cpus, resources)  # fmt: skip
        self.wait_nodes(1)
        return head

    def add_node(self, num_cpus: int, resources: dict) -> subprocess.Popen:
        n = len(self.alive_nodes())
        proc = self._start(["--address", self.gcs], num_cpus, resources)
        self.wait_nodes(n + 1)
        return proc

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.nodes[-1].poll() is not None:  # the node just started has exited
                break
            try:
                if len(self.alive_nodes()) == n:
                    return
            except Exception:  # dashboard still starting
                pass
            time.sleep(0.5)
        raise RuntimeError(f"cluster did not reach {n} alive nodes; logs in {self.temp_dir}")

    def kill_node(self, proc: subprocess.Popen) -> None:
        """Lose a node: SIGKILL its whole process group (raylet, its workers, agents), no clean shutdown."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def shutdown(self) -> None:
        """Stop running jobs, then kill every node's process group and any process left from this cluster's temp dir."""
        self.stop_jobs()
        for p in self.nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_jobs(self, timeout: float = 30) -> None:
        """Stop the jobs still running (their drivers run in their own sessions, outside the nodes' groups)."""
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(self.dashboard)
            running = [j.submission_id for j in client.list_jobs() if not j.status.is_terminal()]
        except Exception:
            return
        for jid in running:
            client.stop_job(jid)
        deadline = time.time() + timeout
        while running and time.time() < deadline:
            running = [j for j in running if not client.get_job_status(j).is_terminal()]
            time.sleep(0.5)

    def leftover_pids(self) -> list[int]:
        """Live processes whose command line names this cluster's temp dir (zombies excluded)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if self.temp_dir.encode() in cmd and state != "Z":
                out.append(int(d.name))
        return out
