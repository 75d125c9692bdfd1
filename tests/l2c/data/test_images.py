"""Image members: one list of image suffixes (any case) and one decoder, for train-vision and eval."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from l2c.data.images import IMAGE_EXTS, ImageTooLarge, decode_image, image_member, sample_image
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


# -- every mode as a viewer shows it (each fixture built with PIL, compared with PIL's own conversion) ------


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def on_white(img: Image.Image) -> np.ndarray:
    """PIL's own compositing of an image with alpha over the documented white background."""
    rgba = img.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(decode_image(data))
    assert got.shape == (48, 64, 3) and (got == got[..., :1]).all()
    assert np.array_equal(got[..., 0], np.rint(ramp / 257).astype(np.uint8))
    assert (got == 255).all(-1).mean() < 0.01  # PIL's convert("RGB") clips: 99.6% white


def test_transparency_is_composited_on_white():
    rng = np.random.default_rng(2)
    rgba = Image.fromarray(rng.integers(0, 256, (24, 32, 4), dtype=np.uint8), "RGBA")
    la = Image.fromarray(rng.integers(0, 256, (24, 32, 2), dtype=np.uint8), "LA")
    pal = Image.fromarray(rng.integers(0, 4, (24, 32), dtype=np.uint8), "P")
    pal.putpalette([10, 200, 30, 250, 0, 0, 0, 0, 255, 90, 90, 90])
    for img, info in ((rgba, {}), (la, {}), (pal, {"transparency": 1})):
        data = encode(img, **info)
        opened = Image.open(io.BytesIO(data))
        want = on_white(opened)
        assert np.array_equal(np.asarray(decode_image(data)), want), img.mode
    got = np.asarray(decode_image(encode(pal, transparency=1)))
    clear = np.asarray(pal) == 1
    assert clear.any() and (got[clear] == 255).all()  # the transparent colour shows the background, not red
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert np.asarray(decode_image(encode(half)))[0, 0].tolist() == [127, 127, 127]


def test_cmyk_and_exif_orientation_as_pil_shows_them():
    rng = np.random.default_rng(3)
    cmyk = Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "CMYK")
    for fmt in ("JPEG", "TIFF"):
        data = encode(cmyk, fmt)
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(data)), want), fmt
    photo = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(photo, "JPEG", quality=100, exif=exif)
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        got = decode_image(data)
        assert np.array_equal(np.asarray(got), want), orientation
        assert got.size == ((40, 60) if orientation in (6, 8) else (60, 40))
        assert decode_image(data, target=16).size[0] < decode_image(data, target=16).size[1] or orientation == 3


def bomb_png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of width x height black pixels (a few hundred KB: the rows compress to nothing)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    body = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body + z.flush()) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9500, 14000])  # over PIL's limit (a warning), over twice it (PIL's error)
def test_decompression_bomb_is_a_reject_not_a_warning(side):
    data = bomb_png(side, side)
    assert side * side > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLarge, match=r"^image_too_large: "):
            decode_image(data)
        img, reason = sample_image(Sample(__key__="k", png=data))
    assert img is None and reason == f"image_too_large: {side * side:,} pixels, over PIL's decompression bomb " \
                                     f"limit of {Image.MAX_IMAGE_PIXELS:,}"
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_make_shards_rejects_a_bomb_and_reencodes_as_shown(tmp_path):
    """make-shards: a bomb-sized image is a counted `image_too_large` reject; a re-encoded 16-bit PNG keeps
    its tones and an EXIF-rotated photo its orientation (`--max-side` re-encodes both)."""
    from l2c.data.make_shards import MakeShardsConfig, make_shards
    from l2c.data.shards import read_tar

    images = tmp_path / "images"
    images.mkdir()
    (images / "bomb.png").write_bytes(bomb_png(9500, 9500))
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(images / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (80, 40), (30, 120, 200)).save(images / "turned.jpg", quality=95, exif=exif)
    records = [{"image_id": k, "file": f, "captions": [f"image {k}"]}
               for k, f in (("bomb", "bomb.png"), ("deep", "deep.png"), ("turned", "turned.jpg"))]  # fmt: skip
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = make_shards(images, tmp_path / "c.jsonl", tmp_path / "out", MakeShardsConfig(max_side=32),
                       show_progress=False)  # fmt: skip
    assert info["written"] == 2 and info["rejected_by_reason"] == {"image_too_large": 1}
    (reject,) = [json.loads(x) for x in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert reject["key"] == "bomb" and reject["reason"] == "image_too_large" and "90,250,000 pixels" in reject["detail"]
    samples = {s["__key__"]: s for s in read_tar(str(tmp_path / "out" / "shard-000000.tar"), [])}
    deep = np.asarray(decode_image(samples["deep"]["jpg"]))
    assert abs(deep.mean() - np.rint(ramp / 257).mean()) < 2  # not white
    turned = decode_image(samples["turned"]["jpg"])
    assert turned.size == (16, 32) and json.loads(samples["turned"]["json"])["width"] == 16
