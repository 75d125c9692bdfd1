"""make-shards' settings and its error, apart from the command so that the annotation importers
(`l2c.data.importers`) and `l2c.data.make_shards` both build on them without importing each other."""

from __future__ import annotations

import os
from dataclasses import dataclass

from l2c.errors import L2CError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class MakeShardsError(L2CError, ValueError):
    """Bad settings or input, or (with strict) the first rejected record."""


@dataclass
class MakeShardsConfig:
    shard_size: int = 1000
    image_field: str = "file"
    key_field: str = "image_id"
    caption_field: str = "captions"
    max_side: int | None = None
    jpeg_quality: int = 90
    strict: bool = False
    workers: int = min(4, os.cpu_count() or 1)
    format: str = "jsonl"  # or an annotation layout in l2c.data.importers (karpathy, docci, ...)
    subset: str | None = None  # the format's split, first N or language (None: what the official evaluation takes)
    key_from_file_name: bool = False  # key = image file name without suffix, '.', '/' and spaces as '_'
    select: str | None = None  # file of keys or image names: only those records
    split: str | None = None  # "train=0.9,val=0.1": records go to parts by a hash of their key
    split_name: str | None = None  # the part this run writes
