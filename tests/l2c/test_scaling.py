"""The scaling model behind docs/cluster.md: its shipped config, and the properties its tables rest on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from l2c.apps.scaling import ScalingConfig, estimate
from l2c.config import CONFIG_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
NODE = json.loads((ROOT / "docs" / "bench" / "bench_node.json").read_text())  # measured by benchmarks/bench_node.py


def cfg(*overrides: str) -> ScalingConfig:
    return load_config(ScalingConfig, CONFIG_DIR / "scaling.yaml", list(overrides))


def test_shipped_config_loads_and_bad_values_are_refused():
    c = cfg()
    assert c.gpus == [8, 64, 512] and c.text.params == 8e9 and c.workload.captions == 75_000_000
    for bad, msg in (("gpus=[0]", "positive"), ("vision.image_size=512", "224 or 336"),
                     ("assumed.embed_mfu=1.5", r"\(0, 1\]"), ("shared_fs_gb_s=0", "positive")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            estimate(cfg(bad), NODE)


def test_compute_is_conserved_and_limits_move_with_the_cluster():
    res = estimate(cfg("gpus=[8, 16, 64, 512]"), NODE)
    tokens = 75e6 * 150  # 15M images x 5 captions
    for r in res["embed"]:
        assert r["limits_s"]["gpu"] * r["gpus"] == pytest.approx(tokens / res["embed_tokens_per_gpu_s"])
        assert r["wall_s"] == pytest.approx(r["fixed_s"] + max(r["limits_s"].values()))
        assert r["gpu_hours"] == pytest.approx(r["gpus"] * r["wall_s"] / 3600)
    walls = [r["wall_s"] for r in res["embed"]]
    assert walls == sorted(walls, reverse=True)  # more GPUs, never slower
    assert len({round(r["limits_s"]["storage"], 6) for r in res["embed"]}) == 1  # bytes out do not depend on GPUs
    assert res["embed"][0]["bottleneck"] == "gpu"
    # the model's weights are read once per node from shared storage: at 512 GPUs, on 1M captions, start-up
    # outweighs the work
    assert res["embed"][-1]["model_load_s"] == pytest.approx(64 * 16 / 10)
    assert estimate(cfg("gpus=[512]", "workload.captions=1000000"), NODE)["embed"][0]["bottleneck"] == "fixed"
    assert res["train"][-1]["bottleneck"] == "storage"  # 15M x 100 KB images through 10 GB/s
    # an epoch reads every image and every caption vector of it: 15M x 100 KB + 75M vectors of 4,096 x 2 B (+ keys)
    vec = res["measured_node"]["bytes_per_vector"] * 4096 / res["measured_node"]["vector_dim_measured"]
    assert res["train"][0]["limits_s"]["storage"] == pytest.approx((15e6 * 100e3 + 75e6 * vec) / 1e9 / 10)
    # the measured per-core rates decide the CPU need: decode cores per node = 8 GPUs x images/s / per-core rate
    t = res["train"][0]
    assert t["cores_per_node"] == pytest.approx(8 * t["images_per_s_per_gpu"] / NODE["image_decode"]["images_per_s_224"])


def test_each_limit_can_be_the_bottleneck():
    assert estimate(cfg("node.cpu_cores=2"), NODE)["train"][0]["bottleneck"] == "cpu"
    assert estimate(cfg("shared_fs_gb_s=0.005"), NODE)["embed"][0]["bottleneck"] == "storage"
    slow = dict(NODE, object_store={**NODE["object_store"], "gb_per_s": 0.001})
    assert estimate(cfg(), slow)["embed"][0]["bottleneck"] == "object_store"
    assert estimate(cfg("node.network_gb_s=1"), NODE)["train"][1]["bottleneck"] == "network"


def test_a_measured_gpu_run_replaces_the_assumption():
    gpu = {"shape": "8b", "device": "NVIDIA H100", "dtype": "bfloat16", "params_non_embedding": 7.0e9,
           "paths": {"hf_naive": {"tokens_per_s": 10000.0, "mfu": 0.2}, "packed": {"tokens_per_s": 30000.0, "mfu": 0.6},
                     "vllm": {"skipped": "not importable"}}}  # fmt: skip
    res = estimate(cfg(), NODE, gpu)
    assert res["embed_tokens_per_gpu_s"] == pytest.approx(30000 * 7 / 8)  # best path, scaled to 8e9 parameters
    assert res["embed_gpu_rate_source"].startswith("measured") and "H100" in res["embed_gpu_rate_source"]
    assert estimate(cfg(), NODE)["embed_gpu_rate_source"].startswith("assumed")


def test_note_script_writes_table_json_and_plot(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scaling_note", ROOT / "benchmarks" / "scaling_note.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--node-json", str(ROOT / "docs" / "bench" / "bench_node.json"), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "scaling_note.json").read_text())["embed"] == json.loads(json.dumps(res["embed"]))
    assert (tmp_path / "scaling_note.png").stat().st_size > 10_000
    assert "tokens/s per GPU (assumed" in capsys.readouterr().out
    fp32 = tmp_path / "gpu.json"
    fp32.write_text(json.dumps({"dtype": "float32", "device": "cpu", "paths": {}}))
    with pytest.raises(SystemExit):
        mod.main(["--gpu-json", str(fp32), "--out", str(tmp_path)])
