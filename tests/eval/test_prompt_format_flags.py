"""--prompt-format on eval-cra and eval-zeroshot: the format reaches the text encoder and is reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2c.cache import TextCache
from l2c.cli import main
from l2c.eval.zeroshot import load_text_encoder
from l2c.teacher import TeacherMismatch, TeacherSpec


@pytest.fixture(scope="module")
def released(tmp_path_factory, shared_data):  # its tokenizer is trained on the shared captions
    from tests.interop.data import make_released_teacher

    return make_released_teacher(tmp_path_factory.mktemp("released"))


def test_eval_cra_embeds_with_the_released_default_or_the_flag(released, tmp_path):
    captions = tmp_path / "captions.jsonl"
    rows = [{"image_id": i, "captions": [f"a dog number {i} runs on the beach", f"a dog {i} on sand"]} for i in range(6)]
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, vectors = {}, {}
    for fmt in ("default", "none"):
        out = tmp_path / f"cra-{fmt}"
        argv = ["eval-cra", "--captions", str(captions), "--model", str(released), "--out", str(out)]
        assert main(argv + (["--prompt-format", fmt] if fmt != "default" else [])) == 0
        results[fmt] = json.loads((out / "eval.json").read_text())
        vectors[fmt] = TextCache(out / "cache").load()[2]
    assert results["default"]["prompt_format"] == "llm2vec-llama3" and results["none"]["prompt_format"] == "none"
    assert not np.allclose(vectors["default"], vectors["none"], atol=1e-3)  # the format changed the vectors
    assert main(["eval-cra", "--captions", str(captions), "--model", str(released), "--prompt-format", "chatml"]) == 2


def test_zeroshot_text_encoder_follows_the_recorded_format(released):
    base = {"model": str(released), "model_path": str(released), "pooling": "mean", "normalize": True,
            "max_length": 64, "dtype": "float32"}  # fmt: skip
    made = load_text_encoder(TeacherSpec.from_dict({**base, "prompt_format": "llm2vec-llama3"}), device="cpu")
    assert made.prompt_format == "llm2vec-llama3"
    old = load_text_encoder(TeacherSpec.from_dict(base), device="cpu")  # a cache from before formats were recorded
    assert old.prompt_format == "none"
    # the flag may repeat the recorded format, never change it: prompts must be embedded as the captions were
    assert load_text_encoder(TeacherSpec.from_dict(base), device="cpu", prompt_format="none").prompt_format == "none"
    with pytest.raises(TeacherMismatch, match="ran with prompt format 'none'"):
        load_text_encoder(TeacherSpec.from_dict(base), device="cpu", prompt_format="llm2vec-llama3")
    # a model that records no teacher (a released one) takes --text-model with the flag
    flag = load_text_encoder(None, str(released), device="cpu", prompt_format="llm2vec-llama3")
    assert flag.prompt_format == "llm2vec-llama3"
    a, b = made.encode(["a photo of a dog."]), old.encode(["a photo of a dog."])
    assert float((a * b).sum()) < 0.9999
