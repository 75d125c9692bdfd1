"""The teacher spec: identity over every key, records of earlier versions, one builder of the text encoder."""

import numpy as np
import pytest

from l2c.errors import L2CError
from l2c.teacher import IDENTITY, TeacherMismatch, TeacherSpec, build_text_encoder, locate, resolve_teacher


def test_records_of_earlier_versions_take_what_l2c_did_then():
    old = TeacherSpec.from_dict({"model": "minilm", "model_fingerprint": "ab", "pooling": "mean", "normalize": True,
                                 "max_length": 512, "dtype": "float32", "instruction": None, "dim": 384,
                                 "fields": ["txt"], "unknown_key": 1})  # fmt: skip
    assert (old.prompt_format, old.engine, old.instruction, old.store_dtype, old.bidirectional) == (
        "none", "hf", "", "float16", True)
    assert set(old.identity()) == set(IDENTITY) and TeacherSpec.from_dict(old.to_dict()) == old


def test_check_same_names_every_differing_key_with_both_values():
    a = TeacherSpec(model="m", model_fingerprint="0123456789abcdef0123", pooling="mean", max_length=512)
    a.check_same(TeacherSpec.from_dict(a.to_dict() | {"engine_version": "other", "model": "renamed"}), "a", "b")
    b = TeacherSpec.from_dict(a.to_dict() | {"pooling": "cls", "max_length": 128})
    with pytest.raises(TeacherMismatch) as e:
        a.check_same(b, "the model", "the cache", "text cache /c")
    msg = str(e.value)
    assert msg.startswith("text cache /c was embedded by another teacher than the model (")
    assert "pooling: the model 'mean', the cache 'cls'; max_length: the model 512, the cache 128" in msg
    assert "\n" not in msg and isinstance(e.value, L2CError)


def test_resolve_build_and_locate_the_packaged_minilm(tmp_path):
    spec = resolve_teacher("minilm", max_length=64)
    assert (spec.dim, spec.pooling, spec.prompt_format, spec.dtype, spec.is_decoder) == (384, "mean", "none", "float32", False)
    assert len(spec.model_fingerprint) == 64 and spec.engine_version.startswith("transformers")
    enc = build_text_encoder(spec)
    vec = enc.encode(["a dog runs on the beach", "two cats sleep"])
    assert vec.shape == (2, 384) and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
    assert (enc.pooling, enc.max_length, enc.prompt_format) == ("mean", 64, "none")
    # the recorded path moved: the name (an alias) still finds the same weights
    moved = TeacherSpec.from_dict(spec.to_dict() | {"model_path": str(tmp_path / "gone")})
    assert locate(moved).model_path == spec.model_path
    with pytest.raises(TeacherMismatch, match="has fingerprint"):
        locate(TeacherSpec.from_dict(spec.to_dict() | {"model_fingerprint": "beef"}))
    with pytest.raises(L2CError, match="pass --text-model"):
        locate(TeacherSpec())
