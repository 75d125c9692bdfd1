"""Typed config for `l2c train-vision`, loaded from `configs/*.yaml` with `section.key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from l2c.config import ConfigError


@dataclass
class VisionConfig:
    """The vision tower: a local transformers model directory, or a config built with random weights."""

    pretrained: str = ""  # local directory (CLIP/SigLIP/DINOv2/ViT); empty: build from `config`
    config: dict = field(default_factory=dict)  # e.g. {model_type: vit, hidden_size: 32, image_size: 32, ...}
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    freeze_blocks: int = 0  # freeze the embeddings and the first K transformer blocks
    gradient_checkpointing: bool = False
    frozen: bool = False  # tower not trained (eval mode, no gradients); train-vision --image-cache needs it
    feature: str = "pooled"  # what the image head reads: pooled | patch_mean | both (see trainer/vision/head.py)
    head_layers: int = 1  # image head: 1 = linear projection; N > 1 = MLP of N Linear layers (ShareLock: 4)
    head_hidden: int = 0  # MLP head width (0: embed_dim)

    def validate(self) -> None:
        if self.feature not in ("pooled", "patch_mean", "both"):
            raise ConfigError(f"model.vision.feature must be pooled, patch_mean or both, got {self.feature!r}")
        if self.head_layers < 1 or self.head_hidden < 0:
            raise ConfigError("model.vision.head_layers must be >= 1 and head_hidden >= 0")
        if not self.pretrained and "model_type" not in self.config:
            raise ConfigError("model.vision: set `pretrained` (a local directory) or `config.model_type`")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError("model.vision: image_mean and image_std need 3 values")
        if self.freeze_blocks < 0:
            raise ConfigError("model.vision.freeze_blocks must be >= 0")


@dataclass
class AdapterConfig:
    """LLM2CLIP text adapter: N pre-LN residual MLP blocks, final LayerNorm, Linear to the joint dim."""

    n_blocks: int = 4
    expansion: int = 2

    def validate(self) -> None:
        if self.n_blocks < 0 or self.expansion < 1:
            raise ConfigError("model.adapter: n_blocks must be >= 0 and expansion >= 1")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    embed_dim: int = 1280
    text_dim: int = 0  # 0: take it from the cache; otherwise the cache must match
    logit_scale_init: float = 14.285714285714286  # 1/0.07
    logit_scale_max: float = 100.0
    # A released LLM2CLIP model directory (e.g. LLM2CLIP-Openai-L-14-336) to start from: tower, projection,
    # adapter and logit scale loaded (trainer/vision/released.py); the tower comes from it.
    init: str = ""
    # Matryoshka dims: the loss is also taken on these prefixes of the joint embedding (each re-normalised), so
    # vectors cut to one of them still retrieve; empty: off. Recorded in the export.
    nested_dims: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.init and not self.vision.pretrained:
            self.vision.pretrained = self.init

    def validate(self) -> None:
        if self.init and self.vision.pretrained != self.init:
            raise ConfigError(
                f"model.init={self.init!r} brings its own tower; model.vision.pretrained must be empty or the same "
                f"directory, not {self.vision.pretrained!r}"
            )
        if self.embed_dim < 1 or self.text_dim < 0:
            raise ConfigError("model.embed_dim must be >= 1 and model.text_dim >= 0")
        dims = self.nested_dims
        if any(not isinstance(d, int) or not 0 < d <= self.embed_dim for d in dims) or dims != sorted(set(dims)):
            raise ConfigError(f"model.nested_dims must be increasing dims in 1..embed_dim ({self.embed_dim}), got {dims}")


@dataclass
class DataConfig:
    """Image shards and how they pair with the text cache."""

    pairing: Literal["auto", "aligned", "join"] = "auto"  # aligned: own shard per tar; join: key index; auto: both
    caption_weights: dict = field(
        default_factory=dict
    )  # field -> weight; empty: uniform over the cache's fields
    workers: int = 2  # DataLoader workers per rank
    shuffle_shards: bool = True
    shuffle_buffer: int = 256  # per-worker sample shuffle buffer (0: stream order)
    random_crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop; [1,1] off
    prefetch_factor: int = 4
    hflip: bool = False  # random horizontal flips (photos; not for text in images or left/right captions)
    shuffle_pairs: bool = False  # control: each image gets another image's captions; learning falls to chance
    # Join pairing (tars without a cache shard of their own) builds an index of the whole cache: refused above
    # this many cache rows, with the `l2c align-cache` command that makes the cache aligned instead.
    join_max_rows: int = 2_000_000

    def validate(self) -> None:
        if self.workers < 0 or self.shuffle_buffer < 0 or self.prefetch_factor < 1:
            raise ConfigError("data: workers and shuffle_buffer must be >= 0, prefetch_factor >= 1")
        if self.join_max_rows < 0:
            raise ConfigError("data.join_max_rows must be >= 0 (0: never build a join index)")
        lo, hi = (self.random_crop_scale + [0, 0])[:2]
        if len(self.random_crop_scale) != 2 or not 0 < lo <= hi <= 1:
            raise ConfigError("data.random_crop_scale must be [lo, hi] with 0 < lo <= hi <= 1")
        for k, w in self.caption_weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"data.caption_weights[{k!r}] must be a number >= 0")


@dataclass
class LossConfig:
    kind: Literal["clip", "siglip"] = "clip"
    gather_with_grad: bool = True  # all-gather features with gradients (open_clip's local loss scheme)
    siglip_bias_init: float = -10.0
    # one: one caption per image and step, drawn by data.caption_weights (the official recipe); all: every
    # cached caption of the image's used fields, all of them its positives (trainer/vision/loss.py)
    positives: Literal["one", "all"] = "one"
    hard_negatives: int = 0  # captions of N mined neighbours per image as extra gallery texts (l2c mine-negatives)
    negatives: str = ""  # the mined neighbours (default: TEXT_CACHE/negatives)

    def validate(self) -> None:
        if self.hard_negatives < 0:
            raise ConfigError(f"loss.hard_negatives must be >= 0, got {self.hard_negatives}")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 5.0  # 0 disables clipping
    layer_decay: float = 1.0  # layer-wise lr decay for the vision blocks (1.0: off)
    head_lr_mult: float = 1.0  # lr multiplier for the projection, adapter and logit scale

    def validate(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.layer_decay <= 1:
            raise ConfigError("optim: lr > 0, weight_decay >= 0 and 0 < layer_decay <= 1 are required")
        if len(self.betas) != 2 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim: betas needs 2 values, warmup_steps >= 0, 0 <= min_lr_ratio <= 1")


@dataclass
class TrainConfig:
    """Everything `l2c train-vision` needs besides the data paths."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 512  # per rank
    steps: int = 1000  # length of the schedule
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    torch_threads: int = 0  # 0: leave torch's default

    def validate(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("batch_size, steps, log_every and checkpoint_every must be >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1")
        if self.optim.warmup_steps >= self.steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be < steps ({self.steps})"
            )
