"""l2c's retrieval figures against CLIP_benchmark's own (`clip_benchmark.metrics.zeroshot_retrieval.evaluate`,
run in .venv-interop on the same embeddings): recall@1/5/10 both directions, several captions per image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2c.eval.retrieval import evaluate_retrieval
from tests.interop.conftest import requires_interop, run_reference
from tests.interop.data import SHARED

pytestmark = [pytest.mark.interop, requires_interop]
KS = [1, 5, 10]


def caption_counts(name: str, n_images: int) -> list[int]:
    lines = (SHARED / "data" / name).read_text().splitlines()
    return [len(json.loads(ln)["captions"]) for ln in lines[:n_images]]


def embeddings(counts: list[int], noise: float, seed: int, dim: int = 48):
    """Image vectors and, per image, one caption vector per real caption: the image's vector plus noise (so
    recall is neither 0 nor 100), each L2-normalised, tie-free."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((len(counts), dim)).astype(np.float32)
    text_image = np.repeat(np.arange(len(counts)), counts)
    texts = images[text_image] + noise * rng.standard_normal((len(text_image), dim)).astype(np.float32)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return unit(images), unit(texts), text_image


@pytest.mark.parametrize(
    "name,n_images,noise,batch",
    [("coco_val2017_captions.jsonl", 2000, 2.5, 64),  # 5 to 7 captions per image
     ("flickr8k_dev_captions.jsonl", 1000, 2.5, 100)],  # 5 per image
)  # fmt: skip
def test_recall_equals_clip_benchmark(tmp_path, name, n_images, noise, batch):
    counts = caption_counts(name, n_images)
    assert len(set(counts)) > 1 or name.startswith("flickr")
    images, texts, text_image = embeddings(counts, noise, seed=n_images)
    emb = tmp_path / "emb.npz"
    np.savez(emb, images=images, texts=texts, text_image=text_image, ks=np.asarray(KS), batch_size=batch)
    run_reference("recall", emb, tmp_path / "cb.json")
    cb = json.loads((tmp_path / "cb.json").read_text())

    image_keys = [f"img-{i}" for i in range(len(images))]
    fields = [f"captions[{j}]" for n in counts for j in range(n)]  # as `--text-field 'captions[*]'` stores them
    for backend in ("faiss", "numpy"):
        got = evaluate_retrieval(image_keys, images, [image_keys[i] for i in text_image], fields, texts, ks=KS,
                                 backend=backend)  # fmt: skip
        check(got, cb, counts, len(images), name, backend)


def check(got: dict, cb: dict, counts: list[int], n_images: int, name: str, backend: str) -> None:
    assert got["n_images"] == n_images and got["n_texts"] == sum(counts)
    for k in KS:
        # CLIP_benchmark's "text retrieval" is image→text (an image finds one of its captions), its "image
        # retrieval" text→image; it reports fractions (float32), l2c percentages.
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(100 * cb[f"text_retrieval_recall@{k}"], abs=1e-4)
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(100 * cb[f"image_retrieval_recall@{k}"], abs=1e-4)
    print(f"{name} ({backend}): l2c {got['image_to_text']} / {got['text_to_image']}; CLIP_benchmark {cb}")
    assert 5 < got["text_to_image"]["R@1"] < 95 and 5 < got["image_to_text"]["R@1"] < 95  # informative figures
