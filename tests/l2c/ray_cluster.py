"""A real multi-node Ray cluster on this machine: a head and worker nodes as separate `ray start` processes.

Every node is `ray start --block` in its own process group, with its own ports and a shared temp dir, so a
node can be lost on purpose (SIGKILL to its group) and everything is torn down by process id at the end.
By default a node runs with the venv's bin first on PATH, as in the cluster image; `l2c_on_path=False`
starts it as `.venv/bin/ray start` from a shell where the venv is not activated, and `ray=ray_without_l2c(d)`
from a Python environment that has Ray but no l2c (as a stock Ray image). Nodes run in the cluster's temp
dir, so no l2c checkout in the current dir is importable there.
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


def node_env(l2c_on_path: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "VIRTUAL_ENV"}
    venv_bin = str(Path(sys.executable).parent)
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and d != venv_bin]
    env.update(
        PATH=os.pathsep.join(([venv_bin] if l2c_on_path else []) + path),
        RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        # notice a lost node within ~3 s instead of ~30 s
        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3", RAY_health_check_timeout_ms="1000",
    )  # fmt: skip
    return env


def ray_without_l2c(root: Path) -> str:
    """A `ray` command in a new venv at `root` whose python has this venv's packages (Ray) but not l2c.

    The venv's site-packages is put on its path by a plain `.pth` line, so the `.pth` files there (l2c's
    editable-install finder among them) are not run: `import ray` works, `import l2c` does not."""
    import sysconfig
    import venv

    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    py = root / "bin" / "python"
    site = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True)
    Path(site.strip(), "l2c-test-ray.pth").write_text(sysconfig.get_path("purelib") + "\n")
    ray = root / "bin" / "ray"
    ray.write_text(f"#!{py}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)
    return str(ray)


class LocalCluster:
    """Head + worker nodes on this machine. `dashboard` is the Job API address for `l2c submit --address`."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="l2c-rc-", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
        self.nodes: list[subprocess.Popen] = []
        self.gcs = f"127.0.0.1:{free_port()}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self._worker_port = 20000 + (os.getpid() % 50) * 200  # 100-port worker ranges, away from Ray's defaults

    def _start(self, args: list[str], num_cpus: int, resources: dict, ray: str = RAY,
               l2c_on_path: bool = True) -> subprocess.Popen:  # fmt: skip
        lo, self._worker_port = self._worker_port, self._worker_port + 100
        cmd = [ray, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
               "--num-gpus", "0", "--resources", json.dumps(resources), "--temp-dir", self.temp_dir,
               "--min-worker-port", str(lo), "--max-worker-port", str(lo + 99),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--disable-usage-stats", "--object-store-memory", str(300 * 2**20), *args]  # fmt: skip
        with open(Path(self.temp_dir) / f"node-{len(self.nodes)}.log", "wb") as log:  # the child keeps its own fd
            proc = subprocess.Popen(cmd, env=node_env(l2c_on_path), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.temp_dir)  # fmt: skip
        self.nodes.append(proc)
        return proc

    def start_head(self, num_cpus: int, resources: dict, **how) -> subprocess.Popen:
        """`how`: `ray=` the `ray` command to start it with, `l2c_on_path=False` (see the module's doc)."""
        port = self.gcs.rsplit(":", 1)[1]
        args = ["--head", "--port", port, "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", self.dashboard.rsplit(":", 1)[1], "--ray-client-server-port", str(free_port())]  # fmt: skip
        return self._start_node(args, num_cpus, resources, 1, how)

    def add_node(self, num_cpus: int, resources: dict, **how) -> subprocess.Popen:
        n = len(self.alive_nodes())
        return self._start_node(["--address", self.gcs], num_cpus, resources, n + 1, how)

    def _start_node(self, args: list[str], num_cpus: int, resources: dict, n: int, how: dict) -> subprocess.Popen:
        """Start a node and wait for `n` alive nodes; again (3 tries) if `ray start` gave up (it waits 30 s for its
        raylet to register, which a loaded 2-core machine can exceed)."""
        for attempt in (1, 2, 3):
            proc = self._start(args, num_cpus, resources, **how)
            try:
                self.wait_nodes(n)
                return proc
            except RuntimeError:
                if attempt == 3 or proc.poll() is None:
                    raise
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # what the failed start left running
                except ProcessLookupError:
                    pass
                time.sleep(5)  # the GCS marks a half-started node dead within ~3 s
        raise AssertionError("unreachable")

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 180) -> None:  # a node can take minutes on a loaded 2-core machine
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
        proc, log = self.nodes[-1], Path(self.temp_dir) / f"node-{len(self.nodes) - 1}.log"
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "still starting"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"cluster did not reach {n} alive nodes (the new node {state}); its log ends:\n{tail}")

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
