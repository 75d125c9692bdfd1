"""Time and cost of the embed and train stages on N GPUs, from measured per-node rates and stated assumptions.

Measured inputs: `benchmarks/bench_node.py` (per-core tokenize, Parquet write, image decode rates, object-store
bandwidth) and, where a GPU run exists, `benchmarks/bench_embed_gpu.py` (tokens/s per GPU, Parquet writes
included). Everything else comes from `configs/scaling.yaml`. Each stage's time is the slowest of its limits
(GPU compute, CPU work per node, object store per node, shared storage), plus start-up and model loading.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from l2c.config import ConfigError


@dataclass
class Workload:
    captions: int = 75_000_000  # 5 per image
    tokens_per_caption: float = 150.0
    images: int = 15_000_000
    image_kb: float = 100.0  # stored JPEG per image


@dataclass
class TextModel:
    params: float = 8.0e9  # non-embedding parameters: 2 x params FLOP per token
    dim: int = 4096
    weights_gb: float = 16.0


@dataclass
class VisionModel:
    train_gflop_per_image: float = 490.0  # ViT-L/14 at 224 px: ~163 GFLOP forward, x3 for training
    image_size: int = 224  # decode rate measured at 224 or 336
    params: float = 3.0e8
    batch_per_gpu: int = 64


@dataclass
class NodeSpec:
    gpus: int = 8
    cpu_cores: int = 96  # physical cores (a p5.48xlarge has 192 vCPUs)
    gpu_bf16_tflops: float = 989.0  # nominal dense bf16 of one H100 SXM
    network_gb_s: float = 400.0  # per node (EFA 3,200 Gb/s)
    price_per_gpu_hour: float = 4.0


@dataclass
class Assumed:
    """Used where no measurement exists (no GPU run): fractions of the nominal bf16 rate."""

    embed_mfu: float = 0.40
    train_mfu: float = 0.40


@dataclass
class ScalingConfig:
    gpus: list[int] = field(default_factory=lambda: [8, 64, 512])
    start_s: float = 120.0  # job start, actor start, CUDA init
    shared_fs_gb_s: float = 10.0  # aggregate bandwidth of the shared filesystem or object store
    workload: Workload = field(default_factory=Workload)
    text: TextModel = field(default_factory=TextModel)
    vision: VisionModel = field(default_factory=VisionModel)
    node: NodeSpec = field(default_factory=NodeSpec)
    assumed: Assumed = field(default_factory=Assumed)

    def validate(self) -> None:
        if not self.gpus or any(g < 1 for g in self.gpus):
            raise ConfigError("gpus must list positive GPU counts")
        if self.vision.image_size not in (224, 336):
            raise ConfigError("vision.image_size must be 224 or 336 (the sizes bench_node measures)")
        for name in ("embed_mfu", "train_mfu"):
            if not 0 < getattr(self.assumed, name) <= 1:
                raise ConfigError(f"assumed.{name} must be in (0, 1]")
        positive = [self.start_s >= 0, self.shared_fs_gb_s > 0, self.node.gpus > 0, self.node.cpu_cores > 0,
                    self.workload.captions > 0, self.workload.images > 0, self.text.params > 0]  # fmt: skip
        if not all(positive):
            raise ConfigError("counts, rates and sizes must be positive")


def node_rates(node: dict, image_size: int) -> dict:
    """The per-core and per-node figures the model uses, from bench_node.json."""
    return {
        "tokenize_tokens_per_core_s": node["read_tokenize"]["bytelevel_bpe"]["tokens_per_s"],
        "write_vectors_per_core_s": node["parquet_write"]["write_vectors_per_s"],
        "bytes_per_vector": node["parquet_write"]["bytes_per_vector"],
        "vector_dim_measured": node["parquet_write"]["dim"],
        "object_store_gb_s": node["object_store"]["gb_per_s"],
        "decode_images_per_core_s": node["image_decode"][f"images_per_s_{image_size}"],
    }


def gpu_embed_rate(cfg: ScalingConfig, gpu: dict | None) -> tuple[float, str]:
    """Tokens/s per GPU for the text model: measured (best path of bench_embed_gpu, end to end) or assumed."""
    if gpu:
        best = max((p for p in gpu["paths"].values() if "tokens_per_s" in p), key=lambda p: p["tokens_per_s"])
        # scale by parameters when the measured shape differs from the configured model
        rate = best["tokens_per_s"] * gpu["params_non_embedding"] / cfg.text.params
        return rate, f"measured: {gpu['shape']} shape on {gpu['device']}, MFU {best['mfu']:.0%}"
    rate = cfg.assumed.embed_mfu * cfg.node.gpu_bf16_tflops * 1e12 / (2 * cfg.text.params)
    return rate, f"assumed: {cfg.assumed.embed_mfu:.0%} of {cfg.node.gpu_bf16_tflops:.0f} TFLOP/s (no GPU run)"


def _row(g: int, cfg: ScalingConfig, limits: dict[str, float], fixed: float, extra: dict) -> dict:
    slowest = max(limits, key=limits.get)
    wall = fixed + limits[slowest]
    bottleneck = "fixed" if fixed > limits[slowest] else slowest  # start-up and model loading outweigh the work
    return {"gpus": g, "nodes": math.ceil(g / cfg.node.gpus), "wall_s": wall, "limits_s": limits,
            "fixed_s": fixed, "bottleneck": bottleneck, "gpu_hours": g * wall / 3600,
            "cost_usd": g * wall / 3600 * cfg.node.price_per_gpu_hour, **extra}  # fmt: skip


def embed_stage(cfg: ScalingConfig, rates: dict, gpu_rate: float) -> list[dict]:
    w, t = cfg.workload, cfg.text
    tokens = w.captions * w.tokens_per_caption
    vec_bytes = rates["bytes_per_vector"] * t.dim / rates["vector_dim_measured"]
    rows = []
    for g in cfg.gpus:
        per_node_gpus = min(g, cfg.node.gpus)
        nodes = math.ceil(g / cfg.node.gpus)
        t_gpu = tokens / (g * gpu_rate)
        node_tokens_s = per_node_gpus * gpu_rate
        node_vectors_s = node_tokens_s / w.tokens_per_caption
        cores = (node_tokens_s / rates["tokenize_tokens_per_core_s"]
                 + node_vectors_s * t.dim / rates["vector_dim_measured"] / rates["write_vectors_per_core_s"])  # fmt: skip
        obj_gb_s = node_vectors_s * (t.dim * 2 + w.tokens_per_caption * 4) / 1e9  # ids in, vectors out
        limits = {
            "gpu": t_gpu,
            "cpu": t_gpu * cores / cfg.node.cpu_cores,
            "object_store": t_gpu * obj_gb_s / rates["object_store_gb_s"],
            "storage": w.captions * vec_bytes / 1e9 / cfg.shared_fs_gb_s,
        }
        load = nodes * t.weights_gb / cfg.shared_fs_gb_s  # every node reads the weights from shared storage
        extra = {"cores_per_node": cores, "object_store_gb_s_per_node": obj_gb_s, "model_load_s": load}
        rows.append(_row(g, cfg, limits, cfg.start_s + load, extra))
    return rows


def train_stage(cfg: ScalingConfig, rates: dict) -> tuple[list[dict], float]:
    w, v = cfg.workload, cfg.vision
    per_gpu = cfg.assumed.train_mfu * cfg.node.gpu_bf16_tflops * 1e12 / (v.train_gflop_per_image * 1e9)
    vec_bytes = rates["bytes_per_vector"] * cfg.text.dim / rates["vector_dim_measured"]
    rows = []
    for g in cfg.gpus:
        t_gpu = w.images / (g * per_gpu)
        cores = min(g, cfg.node.gpus) * per_gpu / rates["decode_images_per_core_s"]
        step_s = v.batch_per_gpu / per_gpu
        allreduce_s = 2 * v.params * 4 / 1e9 / (cfg.node.network_gb_s / cfg.node.gpus) if g > cfg.node.gpus else 0.0
        limits = {
            "gpu": t_gpu,
            "cpu": t_gpu * cores / cfg.node.cpu_cores,
            # every image's JPEG and every one of its caption vectors (a shard is read whole; one drawn per step)
            "storage": (w.images * w.image_kb * 1e3 + w.captions * vec_bytes) / 1e9 / cfg.shared_fs_gb_s,
            "network": t_gpu * allreduce_s / step_s,  # gradient all-reduce, overlapped with compute by DDP
        }
        extra = {"cores_per_node": cores, "images_per_s_per_gpu": per_gpu,
                 "allreduce_over_step": allreduce_s / step_s}  # fmt: skip
        rows.append(_row(g, cfg, limits, cfg.start_s, extra))
    return rows, per_gpu


def estimate(cfg: ScalingConfig, node: dict, gpu: dict | None = None) -> dict:
    """Both stages at every GPU count of `cfg`, with where each input came from."""
    cfg.validate()
    rates = node_rates(node, cfg.vision.image_size)
    rate, source = gpu_embed_rate(cfg, gpu)
    train, per_gpu = train_stage(cfg, rates)
    return {
        "config": asdict(cfg),
        "measured_node": {"machine": node.get("machine", "?"), **rates},
        "embed_tokens_per_gpu_s": rate,
        "embed_gpu_rate_source": source,
        "train_images_per_gpu_s": per_gpu,
        "train_gpu_rate_source": f"assumed: {cfg.assumed.train_mfu:.0%} of {cfg.node.gpu_bf16_tflops:.0f} TFLOP/s",
        "embed": embed_stage(cfg, rates, rate),
        "train": train,
    }
