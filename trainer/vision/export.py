"""Export a trained model to `RUN_DIR/export/` and load it back (the contract eval builds on).

Layout::

    export/vision/               the tower (`save_pretrained`; plain `AutoModel.from_pretrained` loads it)
                                 plus its image processor
    export/heads.safetensors     visual projection, text adapter, logit scale (and SigLIP bias)
    export/l2c_model.json        `l2c.meta.ModelMeta`: shapes, image preprocessing, the teacher and caption fields

>>> m = load_exported("runs/demo")                 # RUN_DIR or RUN_DIR/export
>>> x = torch.stack([m.preprocess(img) for img in images])
>>> img_emb, txt_emb = m.encode_image(x), m.encode_text(cached_vectors)   # both L2-normalised
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from l2c import atomic
from l2c.errors import L2CError
from l2c.meta import ModelMeta
from l2c.teacher import TeacherSpec
from l2c.trainer.vision.model import L2CModel
from l2c.trainer.vision.tower import ImageSpec
from l2c.trainer.vision.transforms import eval_transform

META = "l2c_model.json"
HEADS = "heads.safetensors"


def export_model(
    model: L2CModel,
    out_dir: str | Path,
    processor=None,
    teacher: TeacherSpec | None = None,
    text_fields: list[str] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write `out_dir` (replacing an older export only once the new one is complete); returns it."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = atomic.tmp_dir_for(out_dir)
    model.tower.save_pretrained(tmp / "vision")
    if processor is not None:
        processor.save_pretrained(tmp / "vision")
    heads = {k: v.detach().float().cpu().contiguous() for k, v in model.head_state_dict().items()}
    save_file(heads, str(tmp / HEADS))
    atomic.write_json(tmp / META, ModelMeta.of(model, teacher, text_fields, extra).to_dict())
    return atomic.replace_dir(tmp, out_dir)


class ExportedModel(L2CModel):
    """An `L2CModel` loaded from an export, with `meta` and the eval `preprocess` transform."""

    meta: ModelMeta

    def preprocess(self, image) -> torch.Tensor:
        """PIL image -> normalised [3, H, W] tensor (resize, center crop, normalise)."""
        return eval_transform(image.convert("RGB"), self.image_spec)


def find_export(path: str | Path) -> Path:
    """The export directory of RUN_DIR or RUN_DIR/export; from an object store, a fetched local copy."""
    from l2c.storage import Store, is_url

    if is_url(path):
        store = Store(path)
        for rel in ("", "export"):
            if store.exists(f"{rel}/{META}" if rel else META):
                return store.fetch(rel)
        raise FileNotFoundError(f"{store} holds no exported l2c model ({META} not found in it or in export/)")
    p = Path(path)
    for cand in (p, p / "export"):
        if (cand / META).exists():
            return cand
    raise FileNotFoundError(f"{path} holds no exported l2c model ({META} not found in it or in export/)")


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> ExportedModel:
    """Load an export (RUN_DIR or RUN_DIR/export) as an eval-mode module on `device`."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    root = find_export(path)
    meta = ModelMeta.from_dict(json.loads((root / META).read_text()), str(root / META))
    tower = AutoModel.from_pretrained(root / "vision")
    spec = ImageSpec(meta.image_resize, meta.image_crop, list(meta.image_mean), list(meta.image_std))
    model = ExportedModel(
        tower,
        spec,
        text_dim=meta.text_dim,
        embed_dim=meta.embed_dim,
        n_blocks=int(meta.adapter["n_blocks"]),
        expansion=int(meta.adapter["expansion"]),
        logit_scale_max=meta.logit_scale_max,
        logit_bias_init=meta.logit_bias,
        frozen=meta.frozen_tower,
        feature=meta.image_head.get("feature", "pooled"),
        head_layers=int(meta.image_head.get("layers", 1)),
        head_hidden=int(meta.image_head.get("hidden", 0)),
        nested_dims=meta.nested_dims,  # so that ModelMeta.of(model) of a loaded export keeps them
    )
    heads = load_file(str(root / HEADS))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith("tower.")]
    if missing or unexpected:
        raise L2CError(f"{root / HEADS} does not fit the model: missing {missing}, unexpected {unexpected}")
    model.meta = meta
    return model.to(device).eval()
