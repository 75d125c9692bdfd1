"""Streaming image-text batches: webdataset tars paired with cached text vectors, exactly resumable.

Each DataLoader worker of each rank is a *slot* with a deterministic, endless stream: for epoch e the
shard list is shuffled with (seed, e) and dealt out to slots (or, with fewer shards than slots, every
slot reads every shard and keeps every n-th sample). Samples are paired with their vectors in tar
order (see `pairing.py`), passed through a seeded shuffle buffer, decoded, transformed and batched.
A slot's position is (epoch, items emitted), so resuming replays the stream up to there without
decoding anything and continues with the very same batches.

With an image cache (a frozen tower's features, `l2c embed-images`), the cache gives back each tar's sample
sequence (see `l2c.image_cache`) and batches carry `features [B,width]` instead: same items, same order.

Batches are dicts: `pixel_values [B,3,H,W]`, `vectors [B,dim]`, `keys`, `fields`, `pos` (slot, epoch,
emitted after this batch) and `stats` (skip counts since the slot's previous batch). With `positives="all"`
every caption of an image comes along: `vectors [T,dim]` (an image's captions in field order, T = the sum of
the images' caption counts), `fields` per vector and `owner [T]`, each vector's image in the batch. With mined
neighbours (`negatives`, see `negatives.py`): `negatives [M,dim]`, a caption of each of `hard_negatives`
neighbours per image, and `negative_owner [M]`, the neighbour's image in the batch or -1. Neither changes what
is drawn for anything else, so the images, crops and (with `one`) captions are today's.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from l2c.data.images import TOO_LARGE, ImageTooLarge, decode_image, image_member
from l2c.data.shards import read_tar
from l2c.errors import L2CError
from l2c.fields import covers
from l2c.trainer.vision.pairing import Pairing
from l2c.trainer.vision.tower import ImageSpec
from l2c.trainer.vision.transforms import train_transform

SKIP_KINDS = (
    "missing_vector",
    "missing_image",
    "corrupt_image",
    TOO_LARGE,  # an image past PIL's decompression bomb limit (l2c.data.images)
    "vector_without_image",
    "misordered",
    "duplicate_member",
    "shard_error",
)


class DataError(L2CError):
    """Image shards and a text cache that give nothing to train on."""


def seeded(*parts) -> random.Random:
    return random.Random(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest())


@dataclass
class StreamSpec:
    """Everything a worker needs (picklable)."""

    shards: list[str]
    pairing: Pairing
    image_spec: ImageSpec
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    field_weights: dict[str, float] = field(default_factory=dict)
    shuffle_shards: bool = True
    shuffle_buffer: int = 0
    crop_scale: tuple[float, float] = (0.9, 1.0)
    hflip: bool = False
    start: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (epoch, emitted)
    rotation: int = 0  # physical worker p plays slot (p + rotation) % num_workers
    image_cache: str | None = None  # a frozen tower's features (`l2c embed-images`) instead of decoding images
    feature: str = "pooled"  # which cached feature: pooled | patch_mean | both
    positives: str = "one"  # one: a caption drawn per image (field_weights); all: every caption of the image
    negatives: object = None  # l2c.trainer.vision.negatives.NegativeBank: mined neighbours' captions
    hard_negatives: int = 0  # neighbours per image taken from `negatives`

    @property
    def n_slots(self) -> int:
        return self.world_size * max(1, self.num_workers)


class PairedStream(IterableDataset):
    """Endless stream of paired, transformed batches for this rank (see module docstring)."""

    input_key = "pixel_values"  # the batch's image input (`features` when they come from an image cache)

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def samples(self, url: str, rejects: list) -> Iterator[dict]:
        """The samples of one shard in tar order; what cannot be a sample goes to `rejects` (TarReject)."""
        return read_tar(url, rejects)

    def image_input(self, sample: dict, rng: random.Random) -> torch.Tensor:
        """The model's image input for a sample; raises when the image does not decode."""
        size = self.spec.image_spec.image_size
        img = decode_image(sample[image_member(sample)], target=size)
        return train_transform(img, self.spec.image_spec, rng, self.spec.crop_scale, self.spec.hflip)

    # -- the item stream of one slot ------------------------------------------------------------
    def _epoch_items(self, slot: int, epoch: int) -> Iterator[tuple]:
        """(kind, payload) items of one epoch in deterministic order, before decoding."""
        s = self.spec
        g = s.rank * max(1, s.num_workers) + slot
        order = list(range(len(s.shards)))
        if s.shuffle_shards:
            seeded(s.seed, "shards", epoch).shuffle(order)
        if len(order) >= s.n_slots:
            mine, every = order[g :: s.n_slots], 1
        else:
            mine, every = order, s.n_slots
        rng = seeded(s.seed, "buffer", epoch, g)
        buf: list[tuple] = []
        for shard_idx in mine:
            url = s.shards[shard_idx]
            rejects: list = []  # l2c.data.shards.TarReject: duplicate_member samples, an unreadable tar
            owner = every == 1 or shard_idx % s.n_slots == g  # counts the shard-level events
            paired = s.pairing.pair_shard(url, self.samples(url, rejects))
            for pos, item in enumerate(paired):
                kind = item[0]
                if kind == "end":  # ("end", {"vector_without_image": n, "misordered": m})
                    counts = {k: v for k, v in item[1].items() if v}
                    if owner and counts:
                        item = ("stat", counts)
                    else:
                        continue
                elif every > 1 and pos % every != g:
                    continue
                if not s.shuffle_buffer:  # stream order, stats where they happen
                    yield item
                    continue
                buf.append(item)
                if len(buf) >= s.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
            stats = _reject_stats(rejects) if owner else []
            if s.shuffle_buffer:
                buf += stats
            else:
                yield from stats
        if s.shuffle_buffer:
            rng.shuffle(buf)
        yield from buf

    def _slot_batches(self, slot: int) -> Iterator[dict]:
        """Batches of this slot, epoch after epoch. A batch left short at an epoch's end is completed from the
        next epoch (a slot whose share is below batch_size still trains); an epoch with no usable pair at all
        is a `DataError` naming what went wrong, never an endless wait."""
        s = self.spec
        epoch, skip = s.start.get(slot, (0, 0))
        pixels, vecs, keys, flds, owner, negs, neg_keys = [], [], [], [], [], [], []
        stats: Counter = Counter()
        examples: dict[str, list[str]] = {}
        while True:
            emitted = usable = 0
            seen: Counter = Counter()
            for item in self._epoch_items(slot, epoch):
                emitted += 1
                if emitted <= skip:
                    continue
                kind = item[0]
                if kind == "stat":
                    for k, v in item[1].items():
                        if k.startswith("_"):  # ("_example", kind, text)
                            examples.setdefault(v[0], []).append(v[1])
                        else:
                            stats[k] += v
                            seen[k] += v
                    continue
                if kind != "ok":  # ("missing_vector" | "missing_image", key)
                    stats[kind] += 1
                    seen[kind] += 1
                    examples.setdefault(kind, []).append(item[1])
                    continue
                _, key, sample, choices = item
                rng = seeded(s.seed, "sample", epoch, key)
                try:
                    pix = self.image_input(sample, rng)
                except Exception as e:  # truncated or undecodable image data, or one too large to decode
                    why = TOO_LARGE if isinstance(e, ImageTooLarge) else "corrupt_image"
                    stats[why] += 1
                    seen[why] += 1
                    examples.setdefault(why, []).append(key)
                    continue
                usable += 1
                for name, vec in self._texts(choices, rng):
                    vecs.append(vec)
                    flds.append(name)
                    owner.append(len(keys))
                if s.negatives is not None:
                    for k, vec in s.negatives.draw(key, s.hard_negatives, rng):
                        neg_keys.append(k)
                        negs.append(vec)
                pixels.append(pix)
                keys.append(key)
                if len(keys) == s.batch_size:
                    batch = {
                        self.input_key: torch.stack(pixels),
                        "vectors": torch.from_numpy(np.stack(vecs).astype(np.float32)),
                        "keys": keys,
                        "fields": flds,
                        "pos": (slot, epoch, emitted),
                        "stats": dict(stats),
                        "examples": examples,
                    }
                    if s.positives == "all":
                        batch["owner"] = torch.tensor(owner, dtype=torch.long)
                    if s.negatives is not None:
                        batch.update(self._negatives(negs, neg_keys, keys, vecs[0].shape[-1]))
                    yield batch
                    pixels, vecs, keys, flds, owner, negs, neg_keys = [], [], [], [], [], [], []
                    stats, examples = Counter(), {}
            if emitted == 0:
                raise DataError(
                    f"data worker slot {slot} of rank {s.rank} has nothing to read in {len(s.shards)} shard(s)"
                )
            if usable == 0 and skip == 0:  # a whole epoch inspected, not one pair to train on
                why = ", ".join(f"{k}: {v}" for k, v in seen.most_common()) or "no samples"
                hint = " (no image key matches the text cache: was it made from these shards?)" if (
                    seen["missing_vector"] or seen["vector_without_image"]) else ""  # fmt: skip
                raise DataError(
                    f"no usable image-caption pair in {len(s.shards)} shard(s) for data worker slot {slot} of "
                    f"rank {s.rank} ({why}){hint}"
                )
            epoch, skip = epoch + 1, 0

    def _texts(self, choices: dict[str, np.ndarray], rng: random.Random) -> list[tuple[str, np.ndarray]]:
        """The (field, vector) captions of a sample in the step: one drawn, or all in field order."""
        if self.spec.positives == "all":
            return [(n, choices[n]) for n in sorted(choices)]
        return [self._choose(choices, rng)]

    @staticmethod
    def _negatives(negs: list, neg_keys: list[str], keys: list[str], dim: int) -> dict:
        where = {k: i for i, k in enumerate(keys)}
        return {
            "negatives": torch.from_numpy(np.stack(negs).astype(np.float32) if negs else np.zeros((0, dim), np.float32)),
            "negative_owner": torch.tensor([where.get(k, -1) for k in neg_keys], dtype=torch.long),
        }

    def _choose(self, choices: dict[str, np.ndarray], rng: random.Random) -> tuple[str, np.ndarray]:
        names = sorted(choices)
        if len(names) == 1:
            return names[0], choices[names[0]]
        w = self.spec.field_weights
        weights = [float(w[n]) if n in w else _spec_weight(w, n) for n in names]
        if sum(weights) <= 0:
            weights = [1.0] * len(names)
        name = rng.choices(names, weights=weights)[0]
        return name, choices[name]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w = max(1, self.spec.num_workers)
        physical = 0
        if info is not None:
            physical = info.id
            torch.set_num_threads(1)  # decoding is per-process; leave the cores to the other workers
        yield from self._slot_batches((physical + self.spec.rotation) % w)


def _spec_weight(weights: dict[str, float], name: str) -> float:
    """A row field's weight: that of the spec covering it (`json:captions[*]`), 1 without weights, else 0."""
    if not weights:
        return 1.0
    return next((float(w) for spec, w in weights.items() if covers(spec, name)), 0.0)


def _reject_stats(rejects: list) -> list[tuple]:
    """("stat", ...) items for what the tar reader rejected: each duplicate_member sample (the text cache,
    read with the same reader, has no rows for it either), and an unreadable tar as one shard_error."""
    out = []
    for r in rejects:
        kind = "shard_error" if r.reason == "unreadable_tar" else r.reason
        out.append(("stat", {kind: 1, "_example": (kind, r.detail if kind == "shard_error" else r.key)}))
    return out
