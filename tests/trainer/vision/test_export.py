"""Export round trip: what eval loads is exactly what was trained."""

import json

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from l2c.teacher import TeacherSpec
from l2c.trainer.vision.config import VisionConfig
from l2c.trainer.vision.export import export_model, load_exported
from l2c.trainer.vision.model import L2CModel
from l2c.trainer.vision.tower import build_vision_tower
from tests.trainer.vision.train_helpers import TINY_VIT


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_VIT)))
    model = L2CModel(tower, spec, text_dim=16, embed_dim=24, n_blocks=3, expansion=2).eval()
    teacher = TeacherSpec(model="minilm", dim=16, model_fingerprint="f00d", pooling="cls", prompt_format="none")
    export_model(model, tmp_path / "run" / "export", proc, teacher, ["txt"])

    loaded = load_exported(tmp_path / "run")
    meta = loaded.meta
    assert meta.format == "l2c-model" and meta.version == 1
    assert (meta.vision_model_type, meta.image_size, meta.text_dim, meta.embed_dim) == ("vit", 32, 16, 24)
    assert meta.adapter == {"n_blocks": 3, "expansion": 2}
    assert meta.teacher == teacher and meta.fingerprint == "f00d" and meta.text_fields == ["txt"]
    assert abs(meta.logit_scale - 1 / 0.07) < 1e-4
    on_disk = json.loads((tmp_path / "run/export/l2c_model.json").read_text())
    assert on_disk == meta.to_dict() and on_disk["text_encoder"]["pooling"] == "cls"
    assert on_disk["text_cache_fingerprint"] == "f00d"  # the layout readers of earlier versions know

    img = Image.new("RGB", (64, 48), (200, 30, 30))
    x = loaded.preprocess(img)
    assert x.shape == (3, 32, 32)
    # the saved processor prepares images the same way
    ref = AutoImageProcessor.from_pretrained(tmp_path / "run/export/vision")(img, return_tensors="pt")
    assert torch.allclose(ref["pixel_values"][0], x, atol=1e-2)
    vec = torch.randn(4, 16)
    with torch.no_grad():
        a, b = loaded.encode_image(x[None]), model.encode_image(x[None])
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a.norm(dim=-1), torch.ones(1))
        assert torch.allclose(loaded.encode_text(vec), model.encode_text(vec), atol=1e-6)
        # the adapter sees the L2-normalised vector: scale does not matter
        assert torch.allclose(loaded.encode_text(vec * 7), loaded.encode_text(vec), atol=1e-5)
    # plain transformers loads the tower
    assert type(AutoModel.from_pretrained(tmp_path / "run/export/vision")).__name__ == "ViTModel"


def test_export_written_before_the_typed_meta_loads(tmp_path):
    """An l2c_model.json of an earlier version (teacher keys missing) loads, the missing keys at their defaults."""
    torch.manual_seed(0)
    tower, spec, proc = build_vision_tower(VisionConfig(config=dict(TINY_VIT)))
    export_model(L2CModel(tower, spec, text_dim=16, embed_dim=24).eval(), tmp_path / "export", proc, None, [])
    path = tmp_path / "export/l2c_model.json"
    old = json.loads(path.read_text())
    old["text_encoder"] = {"model": "minilm", "pooling": "mean", "dim": 16, "fields": ["txt"]}
    old["text_cache_fingerprint"] = "beef"
    for key in ("image_resize", "image_crop", "image_head", "frozen_tower", "text_fields"):
        old.pop(key)
    path.write_text(json.dumps(old))
    meta = load_exported(tmp_path / "export").meta
    assert meta.teacher.model_fingerprint == "beef" and meta.teacher.prompt_format == "none"
    assert meta.teacher.engine == "hf" and meta.text_fields == ["txt"] and meta.image_crop == [32, 32]
