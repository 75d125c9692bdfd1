"""Image members: one list of image suffixes (any case) and one decoder, for train-vision and eval."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from l2c.data.images import IMAGE_EXTS, decode_image, image_member, sample_image
from l2c.data.shards import Sample


def jpeg(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_image_member_prefers_in_order_and_ignores_case():
    assert IMAGE_EXTS == ("jpg", "jpeg", "png", "webp")
    assert image_member(Sample(__key__="k", PNG=b"", JPEG=b"")) == "jpeg"
    assert image_member(Sample(__key__="k", txt=b"")) is None
    assert image_member({"__key__": "k", "webp": b""}) == "webp"  # plain dicts too (lower-case suffixes)


def test_decode_and_reasons():
    img = decode_image(jpeg(256), target=64)
    assert img.mode == "RGB" and 64 <= min(img.size) < 256  # JPEG draft: decoded at reduced scale
    assert decode_image(jpeg(32)).size == (32, 32)
    good, reason = sample_image(Sample(__key__="k", JPG=jpeg(16)))
    assert reason is None and good.size == (16, 16)
    assert sample_image(Sample(__key__="k", txt=b"x"))[1] == "no image member (has ['txt'])"
    none, reason = sample_image(Sample(__key__="k", jpg=jpeg(16)[:40]))
    assert none is None and reason.startswith("jpg does not decode: ")
