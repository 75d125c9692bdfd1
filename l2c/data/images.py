"""Image members of samples: which suffixes are images, and decoding them (train-vision, eval)."""

from __future__ import annotations

import io

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample holds several


def image_member(sample) -> str | None:
    """The first of `IMAGE_EXTS` the sample holds (`Sample` lookups ignore case: `k.JPG` is a jpg), or None."""
    return next((ext for ext in IMAGE_EXTS if ext in sample), None)


def decode_image(data: bytes, target: int | None = None) -> Image.Image:
    """Decode image bytes to RGB; JPEGs are decoded at reduced scale when far larger than `target`."""
    img = Image.open(io.BytesIO(data))
    if target and img.format == "JPEG":
        img.draft("RGB", (target, target))  # DCT scaling: never smaller than the requested size
    img.load()
    return img.convert("RGB")


def sample_image(sample, target: int | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, reason) when the sample has no image member or it does not decode."""
    ext = image_member(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return None, f"no image member (has {members})"
    try:
        return decode_image(sample[ext], target), None
    except Exception as e:  # truncated or not an image
        return None, f"{ext} does not decode: {type(e).__name__}: {e}"
