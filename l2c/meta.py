"""The typed records stages hand each other: a text cache's settings and a trained model's metadata.

Both are read and written only through this module. On disk they keep their flat JSON layout (a cache's
`manifest.json` `settings`, an export's `l2c_model.json`), so records written by earlier versions load: a key
they lack takes what l2c did then.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from l2c.errors import L2CError
from l2c.teacher import TeacherSpec

MODEL_FORMAT = "l2c-model"
MODEL_VERSION = 1
WHITESPACE = "kept"  # captions reach the teacher exactly as written; caches before this collapsed whitespace runs


@dataclass(frozen=True)
class TextCacheSettings:
    """What a text cache's manifest says about its vectors: the teacher, the caption fields, how rows are keyed."""

    teacher: TeacherSpec
    fields: tuple[str, ...] = ()
    key_field: str = "key"
    whitespace: str = "collapsed"

    IDENTITY = ("fields", "key_field", "dim", "whitespace")  # a rerun adding to the cache must agree on these too

    @property
    def dim(self) -> int:
        return self.teacher.dim

    @classmethod
    def from_dict(cls, d: dict) -> TextCacheSettings:
        return cls(TeacherSpec.from_dict(d), tuple(d.get("fields", ())), str(d.get("key_field", "key")),
                   str(d.get("whitespace", "collapsed")))  # fmt: skip

    def to_dict(self) -> dict:
        return {**self.teacher.to_dict(), "fields": list(self.fields), "key_field": self.key_field,
                "whitespace": self.whitespace}  # fmt: skip

    def identity(self) -> dict:
        return {**self.teacher.identity(), "fields": list(self.fields), "key_field": self.key_field, "dim": self.dim,
                "whitespace": self.whitespace}  # fmt: skip


@dataclass
class ModelMeta:
    """`l2c_model.json`: the model's shapes and image preprocessing, and the teacher and caption fields of the
    text cache it was trained on (None for a released model that records none)."""

    vision_model_type: str
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    image_resize: object  # int (shortest side) or [h, w]
    image_crop: list[int]
    text_dim: int
    embed_dim: int
    adapter: dict
    image_head: dict = field(default_factory=lambda: {"feature": "pooled", "layers": 1, "hidden": 0})
    frozen_tower: bool = False
    logit_scale: float = 100.0
    logit_scale_max: float = 100.0
    logit_bias: float | None = None
    teacher: TeacherSpec | None = None
    text_fields: list[str] = field(default_factory=list)
    # Matryoshka dims the model was trained at (the full embed_dim among them): a vector's first d values,
    # re-normalised, are its d-dim embedding. Empty: only embed_dim (every export before this field).
    nested_dims: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # train_steps, samples_seen, loss, source, ...
    format: str = MODEL_FORMAT
    version: int = MODEL_VERSION

    @classmethod
    def of(cls, model, teacher: TeacherSpec | None, text_fields: list[str] | None, extra: dict | None = None) -> ModelMeta:
        """The metadata of an `L2CModel` (trained, or loaded from a released layout)."""
        spec = model.image_spec
        return cls(
            vision_model_type=model.tower.config.model_type, image_size=spec.image_size,
            image_mean=list(spec.image_mean), image_std=list(spec.image_std), image_resize=spec.resize,
            image_crop=list(spec.crop), text_dim=int(model.text_dim), embed_dim=int(model.embed_dim),
            adapter=dict(model.adapter_shape), image_head=dict(model.image_head_shape), frozen_tower=bool(model.frozen),
            logit_scale=float(model.scale().detach()), logit_scale_max=float(model.logit_scale_max),
            logit_bias=float(model.logit_bias.detach()) if model.logit_bias is not None else None,
            teacher=teacher, text_fields=list(text_fields or []), extra=dict(extra or {}),
            nested_dims=[int(d) for d in getattr(model, "nested_dims", [])],
        )  # fmt: skip

    @property
    def fingerprint(self) -> str:
        return self.teacher.model_fingerprint if self.teacher else ""

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> ModelMeta:
        if d.get("format") != MODEL_FORMAT or int(d.get("version", -1)) > MODEL_VERSION:
            raise L2CError(f"{where or 'model metadata'}: not an l2c model export this version reads "
                           f"(format {d.get('format')!r}, version {d.get('version')!r})")  # fmt: skip
        known = {"vision_model_type", "image_size", "image_mean", "image_std", "image_resize", "image_crop",
                 "text_dim", "embed_dim", "adapter", "image_head", "frozen_tower", "logit_scale", "logit_scale_max",
                 "logit_bias", "text_fields", "nested_dims", "format", "version"}  # fmt: skip
        kw = {k: d[k] for k in known if k in d and d[k] is not None}
        kw.setdefault("image_resize", d["image_size"])
        kw.setdefault("image_crop", [d["image_size"], d["image_size"]])
        recorded = d.get("text_encoder") or {}
        teacher = TeacherSpec.from_dict(recorded) if recorded.get("model") else None
        if teacher is not None and d.get("text_cache_fingerprint") and not teacher.model_fingerprint:
            teacher = replace(teacher, model_fingerprint=d["text_cache_fingerprint"])
        if "text_fields" not in kw:
            kw["text_fields"] = list(recorded.get("fields", []))
        extra = {k: v for k, v in d.items() if k not in known and k not in ("text_encoder", "text_cache_fingerprint")}
        return cls(**kw, teacher=teacher, extra=extra)

    def to_dict(self) -> dict:
        """The JSON layout (flat; `text_encoder` holds the teacher as a cache manifest records it)."""
        d = asdict(self)
        d.pop("teacher")
        extra = d.pop("extra")
        teacher = {**self.teacher.to_dict(), "fields": list(self.text_fields)} if self.teacher else {}
        return {"format": d.pop("format"), "version": d.pop("version"), **d,
                "text_cache_fingerprint": self.fingerprint, "text_encoder": teacher, **extra}  # fmt: skip
