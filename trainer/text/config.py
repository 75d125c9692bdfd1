"""Typed config of `l2c finetune-text`: caption-contrastive fine-tuning of a text encoder (LLM2CLIP stage 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from l2c.config import ConfigError

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TextModelConfig:
    """How the text model is loaded and pooled."""

    path: str = ""  # a model directory, or `minilm` (set by --model)
    pooling: str = "mean"  # mean | cls | last
    bidirectional: bool | None = None  # None: decoders are made bidirectional, encoders already are
    max_length: int = 128  # tokens per caption (longer ones are truncated)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    prompt_format: str | None = None  # llm2vec-llama3, ...: how captions are wrapped (None: the model's own)

    def validate(self) -> None:
        from l2c.pipeline.prompt_formats import NAMES

        if self.prompt_format is not None and self.prompt_format not in NAMES:
            raise ConfigError(f"model.prompt_format must be one of {', '.join(NAMES)}, got {self.prompt_format!r}")
        if self.pooling not in ("mean", "cls", "last"):
            raise ConfigError(f"model.pooling must be mean, cls or last, got {self.pooling!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be >= 8, got {self.max_length}")


@dataclass
class LoraConfig:
    """LoRA adapters through peft; disabled means full fine-tuning (small encoders)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def validate(self) -> None:
        if self.enabled and (self.r < 1 or not self.target_modules):
            raise ConfigError("lora.r must be >= 1 and lora.target_modules non-empty")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def peft_targets(self) -> str | list[str]:
        """peft takes the string 'all-linear' on its own, module-name suffixes as a list."""
        return "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)


@dataclass
class MntpConfig:
    """Masked next-token prediction before the contrastive stage (LLM2Vec), decoders only."""

    enabled: bool = False
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-5
    mask_prob: float = 0.2  # fraction of tokens to predict; of those 80% masked, 10% random, 10% kept
    mask_token: str = ""  # empty: the tokenizer's mask token, else "_" (as LLM2Vec does for Llama)

    def validate(self) -> None:
        if self.enabled and self.steps < 1:
            raise ConfigError("mntp.steps must be >= 1 when mntp is enabled")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mntp.mask_prob must be in (0, 1), got {self.mask_prob}")


@dataclass
class TextDataConfig:
    """Where positive pairs come from."""

    pairs: list[str] = field(default_factory=list)  # captions files / dirs / text caches (set by --pairs)
    key_field: str = ""  # empty: the first of image_id, key, id, image present in a record
    captions_field: str = ""  # empty: the first of captions, texts, caption, text present
    min_chars: int = 1  # captions shorter than this (after stripping) are dropped
    text_ratio: float = 0.0  # fraction of pairs that are one sentence twice (SimCSE, positives by dropout)
    text_corpus: list[str] = field(default_factory=list)  # .txt (a sentence a line) / .jsonl ("text"); empty: captions

    def validate(self) -> None:
        if not 0.0 <= self.text_ratio <= 1.0:
            raise ConfigError(f"data.text_ratio must be in [0, 1], got {self.text_ratio}")


@dataclass
class TextTrainConfig:
    """The contrastive stage: supervised SimCSE / InfoNCE with in-batch negatives."""

    batch_size: int = 64  # pairs per step, across all workers (each pair from a different image)
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    steps: int = 0  # schedule length and last step; 0: one pass over the images (epochs below)
    epochs: float = 1.0
    max_minutes: float = 0.0  # stop (with a checkpoint) after this wall time; 0: no bound
    max_steps: int = 0  # stop this invocation after this step, schedule unchanged (--max-steps; 0: no bound)
    temperature: float = 0.05
    symmetric: bool = True  # also caption 2 -> caption 1 (CLIP-style two-way loss)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2

    def validate(self) -> None:
        if self.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2 (in-batch negatives)")
        if self.temperature <= 0:
            raise ConfigError(f"train.temperature must be > 0, got {self.temperature}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.keep_checkpoints < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("train.keep_checkpoints, train.checkpoint_every and train.log_every must be >= 1")
        if self.steps < 0 or self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("train.steps and train.max_steps must be >= 0 and train.epochs > 0")


@dataclass
class EvalConfig:
    """Caption retrieval accuracy (CRA) measured during training on `--eval-captions` files."""

    captions: list[str] = field(default_factory=list)  # captions files (set by --eval-captions)
    every: int = 100  # steps between evaluations (also at step 0 and at the end)
    max_images: int = 1000  # images per file during training (0: all); the final evaluation uses all


@dataclass
class DistConfig:
    """One process, or Ray Train workers (DDP; in-batch negatives gathered across workers)."""

    num_workers: int = 0  # 0: this process; N >= 1: N Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int = 1
    ray_address: str = ""  # empty: RAY_ADDRESS or a private local Ray


@dataclass
class FinetuneTextConfig:
    model: TextModelConfig = field(default_factory=TextModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    mntp: MntpConfig = field(default_factory=MntpConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    train: TextTrainConfig = field(default_factory=TextTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> None:
        """Whole-config checks; `check_runnable` adds those that need the run's inputs."""
        if self.dist.num_workers > 1 and self.train.batch_size % self.dist.num_workers:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) must divide evenly over "
                f"dist.num_workers ({self.dist.num_workers})"
            )


    def check_runnable(self) -> None:
        if not self.model.path:
            raise ConfigError("no model: pass --model (a model directory or `minilm`) or set model.path")
        if not self.data.pairs:
            raise ConfigError("no caption pairs: pass --pairs FILE (JSONL/Parquet captions, or a text cache)")


# Settings a resume may change (see l2c.trainer.resume): the schedule's length, time and step bounds of this
# invocation, logging, checkpoint and evaluation frequency, and where the workers run.
RESUME_SAFE = ("train.steps", "train.epochs", "train.max_steps", "train.max_minutes", "train.log_every",
               "train.checkpoint_every", "train.keep_checkpoints", "eval", "dist")  # fmt: skip
