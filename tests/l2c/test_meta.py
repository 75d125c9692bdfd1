"""ModelMeta: nested dims recorded in an export and read back; an export written before the field loads."""

from __future__ import annotations

import json

from l2c.meta import ModelMeta
from l2c.trainer.vision.export import META, load_exported
from tests.eval.eval_reference import export_tiny_model

SETTINGS = {"model": "test-encoder", "dim": 16, "fields": ["txt"], "model_fingerprint": "f00d"}


def test_nested_dims_round_trip_and_old_exports_load(tmp_path):
    export = export_tiny_model(tmp_path / "run", 16, SETTINGS)
    d = json.loads((export / META).read_text())
    assert d["nested_dims"] == []  # a model trained without them
    d["nested_dims"] = [8, 16, 24]
    assert ModelMeta.from_dict(d).nested_dims == [8, 16, 24]
    assert ModelMeta.from_dict(ModelMeta.from_dict(d).to_dict()).to_dict() == ModelMeta.from_dict(d).to_dict()
    del d["nested_dims"]  # as exports were written before the field
    (export / META).write_text(json.dumps(d))
    loaded = load_exported(tmp_path / "run")
    assert loaded.meta.nested_dims == [] and "nested_dims" not in loaded.meta.extra
