"""Training a frozen tower's head from an image cache (`train-vision --image-cache DIR`).

The cache (`l2c embed-images`) holds the tower's features per image in tar key order, plus the position of
every sample that got none; `CachedFeatureStream` replays each tar's sample sequence from it, so pairing,
shuffling, field choice, skip counts and resume positions are those of training on the tars with the tower
frozen (`model.vision.frozen=true`, `data.random_crop_scale=[1,1]`): same batches, same losses, no decoding.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from l2c.cache import CacheError, TextCache
from l2c.data.images import TOO_LARGE, ImageTooLarge
from l2c.data.shards import TarReject
from l2c.image_cache import ImageCache
from l2c.trainer.vision.config import TrainConfig
from l2c.trainer.vision.data import PairedStream
from l2c.trainer.vision.tower import ImageSpec


class CachedFeatureStream(PairedStream):
    """`PairedStream` whose samples and image inputs come from an image cache (batches carry `features`)."""

    input_key = "features"

    def __init__(self, spec):
        super().__init__(spec)
        self._cache: ImageCache | None = None

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def samples(self, url: str, rejects: list) -> Iterator[dict]:
        if self._cache is None:  # once per process, as the text cache (pairing.py)
            self._cache = ImageCache(self.spec.image_cache)
        name = self._cache.shard_for_source(url)
        if name is None:  # checked before training starts; a cache changed since is an unreadable shard
            rejects.append(TarReject(url, "unreadable_tar", None, None, f"{url}: no shard in image cache"))
            return iter(())
        samples, tar_rejects = self._cache.samples(name, self.spec.feature)
        for r in tar_rejects:
            rejects.append(
                TarReject(r.get("source", url), r["reason"], r.get("key"), r.get("member"), r["detail"])
            )
        return iter(samples)

    def image_input(self, sample: dict, rng: random.Random) -> torch.Tensor:
        features = sample["__features__"]
        if features is None:  # the image did not decode when the cache was made: skipped for the same reason
            if sample.get("__reject__") == TOO_LARGE:
                raise ImageTooLarge(f"{sample['__key__']}: no feature (image_too_large when the cache was made)")
            raise ValueError(f"{sample['__key__']}: no feature (corrupt image)")
        return torch.from_numpy(
            np.array(features, np.float32)
        )  # a copy: the cache's arrays are read-only views


def image_cache_shards(cache: ImageCache) -> list[str]:
    """The tars the cache was made from, in shard-name order (what --images would list)."""
    return [cache.manifest.shards[name].source for name in cache.shard_names]


def check_image_cache(cfg: TrainConfig, cache: ImageCache, text: TextCache, spec: ImageSpec, width: int,
                      shards: list[str]) -> None:  # fmt: skip
    """Refuse, with one line, an image cache this run cannot train from: not a frozen run, another tower,
    other preprocessing, dims that disagree, shards it lacks, or no key in common with the text cache."""
    from l2c.models import fingerprint

    v = cfg.model.vision
    made_with = cache.settings.get("model", "?")
    if not v.frozen:
        raise CacheError("--image-cache holds a frozen tower's features: set model.vision.frozen=true")
    if not v.pretrained:
        raise CacheError(f"--image-cache needs model.vision.pretrained=TOWER_DIR, the tower directory the cache "
                         f"was made with ({made_with})")  # fmt: skip
    fp = fingerprint(v.pretrained)
    if fp != cache.fingerprint:
        raise CacheError(
            f"image cache {cache.dir} was made with tower {made_with} (fingerprint {cache.fingerprint[:16]}…), not "
            f"model.vision.pretrained={v.pretrained} ({fp[:16]}…): train with that tower, or re-embed the images "
            f"with `l2c embed-images --model {v.pretrained}`"
        )
    if cache.dim != width:
        raise CacheError(f"image cache {cache.dir} holds {cache.dim}-dim features but the tower "
                         f"{v.pretrained} gives {width}-dim ones: the cache is damaged; re-embed into a new --out")  # fmt: skip
    cache.check_dims()
    cache.check_feature(v.feature)
    if not cache.manifest.shards:
        raise CacheError(f"image cache {cache.dir} has no finished shards")
    if cache.settings.get("image_spec") != spec.to_dict():
        raise CacheError(f"image cache {cache.dir} was preprocessed as {cache.settings.get('image_spec')}, the "
                         f"tower now gives {spec.to_dict()}: re-embed the images")  # fmt: skip
    lacking = [u for u in shards if cache.shard_for_source(u) is None]
    if lacking:
        raise CacheError(f"image cache {cache.dir} has no shard for {len(lacking)} of the --images tars "
                         f"(first: {lacking[0]}); embed them with `l2c embed-images`")  # fmt: skip
    image_keys = cache.keys()
    for _, t in text.iter_tables(["key"]):
        if not image_keys.isdisjoint(t.column("key").to_pylist()):
            return
    some = sorted(image_keys)[:2]
    raise CacheError(f"no key of image cache {cache.dir} (e.g. {some}) is in text cache {text.dir}: the two "
                     "caches were not made from the same tars")  # fmt: skip
