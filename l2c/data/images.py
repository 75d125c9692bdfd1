"""Image members of samples: which suffixes are images, and decoding them (train-vision, eval, make-shards).

Every image becomes 8-bit RGB as an image viewer shows it: EXIF orientation applied (`ImageOps.exif_transpose`),
16-bit samples scaled to 8 bits (v / 257, rounded; PIL's own `convert` clips them, which turns a 16-bit
photo white), transparency (RGBA, LA, a palette with a transparent colour) composited over a white
background (`BACKGROUND`), CMYK and other modes through PIL's conversion. An image over PIL's decompression
bomb limit (`Image.MAX_IMAGE_PIXELS`, 89.5 million pixels) is refused (`ImageTooLarge`) before it is decoded:
callers count it as a reject with that reason, never decode it with only a warning.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample holds several


def image_member(sample) -> str | None:
    """The first of `IMAGE_EXTS` the sample holds (`Sample` lookups ignore case: `k.JPG` is a jpg), or None."""
    return next((ext for ext in IMAGE_EXTS if ext in sample), None)


BACKGROUND = (255, 255, 255)  # what shows through transparent pixels
TOO_LARGE = "image_too_large"  # the reject reason of an image over the decompression bomb limit
ORIENTATION = 0x0112  # the EXIF orientation tag


class ImageTooLarge(ValueError):
    """An image with more pixels than PIL's decompression bomb limit: refused, not decoded."""


def open_image(data: bytes) -> Image.Image:
    """`Image.open` of image bytes (header only), refusing one over the decompression bomb limit."""
    try:  # (catch_warnings is process-wide: threads racing here can at worst leave this one filter set)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLarge(_too_large(int(found.group(1))) if found else f"{TOO_LARGE}: {e}") from None
    if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:  # (the filter is per process)
        raise ImageTooLarge(_too_large(img.width * img.height))
    return img


def _too_large(pixels: int) -> str:
    return f"{TOO_LARGE}: {pixels:,} pixels, over PIL's decompression bomb limit of {Image.MAX_IMAGE_PIXELS:,}"


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB, as a viewer shows it (see the module docstring)."""
    if img.getexif().get(ORIENTATION, 1) != 1:  # (exif_transpose copies even an upright image)
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit samples (PNG, TIFF): v / 257
        a = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), img).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, target: int | None = None) -> Image.Image:
    """Decode image bytes to 8-bit RGB (`to_rgb`); JPEGs are decoded at reduced scale when far larger than
    `target`. Raises `ImageTooLarge` past the decompression bomb limit, PIL's errors for broken data."""
    img = open_image(data)
    if target and img.format == "JPEG":
        img.draft(img.mode if img.mode == "CMYK" else "RGB", (target, target))  # DCT scaling, never smaller
    img.load()
    return to_rgb(img)


def sample_image(sample, target: int | None = None) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, reason) when the sample has no image member or it does not decode."""
    ext = image_member(sample)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        return None, f"no image member (has {members})"
    try:
        return decode_image(sample[ext], target), None
    except ImageTooLarge as e:
        return None, str(e)
    except Exception as e:  # truncated or not an image
        return None, f"{ext} does not decode: {type(e).__name__}: {e}"
