"""`l2c export --format open_clip` loaded by open_clip itself (`create_model_and_transforms('local-dir:DIR')`, in
.venv-interop): its image features equal l2c's, on l2c's pixel tensors and on real photos each side prepares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2c.cli import main
from l2c.eval.model import load_model
from l2c.trainer.vision.export import export_model
from tests.interop.conftest import requires_interop, run_reference
from tests.interop.data import SHARED
from tests.trainer.vision.test_released import save_released

pytestmark = [pytest.mark.interop, requires_interop]


def test_open_clip_loads_the_export_and_gives_l2c_features(tmp_path):
    from PIL import Image

    save_released(tmp_path / "released", seed=4)  # a tiny random CLIP ViT-in-LLM2CLIP model (quick_gelu)
    model = load_model(tmp_path / "released")
    export_model(model, tmp_path / "run" / "export", None, None, [])
    assert (
        main(["export", str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    )

    photos = sorted((SHARED / "data" / "coco_mini_val2017").glob("*.jpg"))[:12]
    assert len(photos) == 12
    (tmp_path / "images.txt").write_text("\n".join(str(p) for p in photos))
    pixels = torch.stack([model.preprocess(Image.open(p)) for p in photos])
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    run_reference(
        "open_clip", tmp_path / "oc", tmp_path / "pixels.npy", tmp_path / "images.txt", tmp_path / "oc.npz"
    )
    ref = np.load(tmp_path / "oc.npz")

    with torch.no_grad():
        mine = model.encode_image(pixels).numpy()  # L2-normalised
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    same_pixels = float(np.abs(unit(ref["given"]) - mine).max())
    own_pixels = float(np.abs(ref["own_pixels"] - pixels.numpy()).max())
    with torch.no_grad():
        own = float(
            np.abs(unit(ref["own"]) - model.encode_image(torch.from_numpy(ref["own_pixels"])).numpy()).max()
        )
    end_to_end = float((unit(ref["own"]) * mine).sum(1).min())  # each side's own preprocessing of the photos
    (tmp_path / "parity.json").write_text(
        json.dumps(
            {
                "same_pixels": same_pixels,
                "open_clip_pixels": own,
                "pixels": own_pixels,
                "end_to_end_min_cos": end_to_end,
            }
        )
    )
    print(
        f"open_clip {ref['version']}: max |feature diff| {same_pixels:.2e} on l2c's pixels, {own:.2e} on "
        f"open_clip's; preprocessing max |pixel diff| {own_pixels:.2e}; end to end min cosine {end_to_end:.6f}"
    )
    # the model: open_clip's ViT on the exported weights computes l2c's features, whoever prepared the pixels
    assert same_pixels < 1e-5 and own < 1e-5
    # preprocessing: open_clip's own (from the exported preprocess_cfg: shortest-side bicubic resize, center
    # crop, l2c's mean/std) rounds the resized long side and the crop offset differently from l2c's by at
    # most a pixel, so the photos' features agree closely but not to float precision
    assert end_to_end > 0.95, end_to_end
