"""Image transforms with the vision model's own processor settings (PIL + torch, seeded per sample).

Decoding is `l2c.data.images.decode_image`."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from l2c.trainer.vision.tower import ImageSpec

RESAMPLE = Image.Resampling.BICUBIC


def _resize(img: Image.Image, resize) -> Image.Image:
    if isinstance(resize, (list, tuple)):
        h, w = resize
        return img.resize((w, h), RESAMPLE)
    w, h = img.size  # the long side truncated, as transformers' CLIP processor and torchvision's Resize do
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    return img if size == img.size else img.resize(size, RESAMPLE)


def _center_crop(img: Image.Image, hw) -> Image.Image:
    h, w = hw
    W, H = img.size
    left, top = max(0, (W - w) // 2), max(0, (H - h) // 2)
    return img.crop((left, top, left + w, top + h))


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return arr.sub_(m).div_(s)


def eval_transform(img: Image.Image, spec: ImageSpec) -> torch.Tensor:
    """Resize, center crop, normalise: what the model's image processor does."""
    img = _resize(img, spec.resize)
    if spec.crop:
        img = _center_crop(img, spec.crop)
    elif not isinstance(spec.resize, (list, tuple)):
        img = _center_crop(img, [spec.resize, spec.resize])
    return to_tensor(img, spec.image_mean, spec.image_std)


def train_transform(
    img: Image.Image, spec: ImageSpec, rng: random.Random, scale=(0.9, 1.0), hflip: bool = False
) -> torch.Tensor:
    """RandomResizedCrop (area `scale`, ratio 3/4..4/3) to the model's input size, a horizontal flip with
    probability 1/2 if `hflip`, then normalise."""
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if scale[0] >= 1.0:
        return eval_transform(img, spec)
    size = spec.image_size
    W, H = img.size
    area = W * H
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= W and 0 < h <= H:
            left, top = rng.randint(0, W - w), rng.randint(0, H - h)
            break
    else:  # fall back to a center crop of the largest square
        w = h = min(W, H)
        left, top = (W - w) // 2, (H - h) // 2
    img = img.resize((size, size), RESAMPLE, box=(left, top, left + w, top + h))
    return to_tensor(img, spec.image_mean, spec.image_std)
