"""Streaming image-text batches: webdataset tars paired with cached text vectors, exactly resumable.

Each DataLoader worker of each rank is a *slot* with a deterministic, endless stream: for epoch e the
shard list is shuffled with (seed, e) and dealt out to slots (or, with fewer shards than slots, every
slot reads every shard and keeps every n-th sample). Samples are paired with their vectors in tar
order (see `pairing.py`), passed through a seeded shuffle buffer, decoded, transformed and batched.
A slot's position is (epoch, items emitted), so resuming replays the stream up to there without
decoding anything and continues with the very same batches.

Batches are dicts: `pixel_values [B,3,H,W]`, `vectors [B,dim]`, `keys`, `fields`, `pos` (slot, epoch,
emitted after this batch) and `stats` (skip counts since the slot's previous batch).
"""

from __future__ import annotations

import glob
import hashlib
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from l2c.trainer.vision.pairing import IMAGE_EXTS, Pairing
from l2c.trainer.vision.tower import ImageSpec
from l2c.trainer.vision.transforms import decode_image, train_transform

SKIP_KINDS = (
    "missing_vector",
    "missing_image",
    "corrupt_image",
    "vector_without_image",
    "misordered",
    "shard_error",
)


def expand_shards(spec: str | Path | list) -> list[str]:
    """Image tars from paths, directories (their `*.tar`), globs, brace ranges (`shard-{000000..000009}.tar`),
    `pipe:` commands and fsspec URLs (`s3://bucket/tars/*.tar` too), `::`-separated or a list."""
    import webdataset as wds

    from l2c.storage import glob_urls, is_url, normalize

    items = spec if isinstance(spec, (list, tuple)) else [spec]
    out: list[str] = []
    for item in items:
        for url in wds.shardlists.expand_urls(normalize(item)):
            if url.startswith("pipe:") or is_url(url) and not any(c in url for c in "*?["):
                out.append(url)
            elif is_url(url):
                hits = glob_urls(url)
                if not hits:
                    raise FileNotFoundError(f"no shards match {url!r}")
                out += hits
            elif any(c in url for c in "*?["):
                hits = sorted(glob.glob(url))
                if not hits:
                    raise FileNotFoundError(f"no shards match {url!r}")
                out += [str(Path(h).resolve()) for h in hits]
            else:
                p = Path(url).expanduser()
                if p.is_dir():
                    hits = sorted(p.glob("*.tar"))
                    if not hits:
                        raise FileNotFoundError(f"directory {url!r} holds no .tar shards")
                    out += [str(h.resolve()) for h in hits]
                elif not p.exists():
                    raise FileNotFoundError(f"image shard {url!r} does not exist")
                else:
                    out.append(str(p.resolve()))
    if not out:
        raise FileNotFoundError(f"no image shards in {spec!r}")
    return out


def open_url(url: str):
    """A binary stream for a local path, `pipe:` command, or any URL fsspec can open."""
    import webdataset as wds

    if "://" in url and not url.startswith(("file://", "pipe:")):
        import fsspec

        return fsspec.open(url, "rb").open()
    return wds.gopen(url.removeprefix("file://"))


def read_tar(url: str, errors: list) -> Iterator[dict]:
    """Samples of one tar in order; a read error ends the shard and is appended to `errors`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exn):
        errors.append(f"{type(exn).__name__}: {str(exn.args[0] if exn.args else exn)[:200]}")
        return False

    try:
        stream = open_url(url)
    except Exception as e:  # unreachable URL, permissions
        errors.append(f"{type(e).__name__}: {e}")
        return
    try:
        yield from group_by_keys(
            tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler
        )
    finally:
        stream.close()


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
    start: dict[int, tuple[int, int]] = field(default_factory=dict)  # slot -> (epoch, emitted)
    rotation: int = 0  # physical worker p plays slot (p + rotation) % num_workers

    @property
    def n_slots(self) -> int:
        return self.world_size * max(1, self.num_workers)


class PairedStream(IterableDataset):
    """Endless stream of paired, transformed batches for this rank (see module docstring)."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

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
            errors: list[str] = []
            owner = every == 1 or shard_idx % s.n_slots == g  # counts the shard-level events
            paired = s.pairing.pair_shard(url, read_tar(url, errors))
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
            if errors and owner:
                stat = ("stat", {"shard_error": 1, "_error": f"{url}: {errors[0]}"})
                if s.shuffle_buffer:
                    buf.append(stat)
                else:
                    yield stat
        if s.shuffle_buffer:
            rng.shuffle(buf)
        yield from buf

    def _slot_batches(self, slot: int) -> Iterator[dict]:
        s = self.spec
        epoch, skip = s.start.get(slot, (0, 0))
        size = s.image_spec.image_size
        while True:
            emitted = 0
            pixels, vecs, keys, flds = [], [], [], []
            stats: Counter = Counter()
            examples: dict[str, list[str]] = {}
            for item in self._epoch_items(slot, epoch):
                emitted += 1
                if emitted <= skip:
                    continue
                kind = item[0]
                if kind == "stat":
                    for k, v in item[1].items():
                        if k == "_error":
                            examples.setdefault("shard_error", []).append(v)
                        else:
                            stats[k] += v
                    continue
                if kind != "ok":  # ("missing_vector" | "missing_image", key)
                    stats[kind] += 1
                    examples.setdefault(kind, []).append(item[1])
                    continue
                _, key, sample, choices = item
                rng = seeded(s.seed, "sample", epoch, key)
                try:
                    img = decode_image(sample[_image_member(sample)], target=size)
                    pix = train_transform(img, s.image_spec, rng, s.crop_scale)
                except Exception:  # truncated or undecodable image data
                    stats["corrupt_image"] += 1
                    examples.setdefault("corrupt_image", []).append(key)
                    continue
                name, vec = self._choose(choices, rng)
                pixels.append(pix)
                vecs.append(vec)
                keys.append(key)
                flds.append(name)
                if len(keys) == s.batch_size:
                    yield {
                        "pixel_values": torch.stack(pixels),
                        "vectors": torch.from_numpy(np.stack(vecs).astype(np.float32)),
                        "keys": keys,
                        "fields": flds,
                        "pos": (slot, epoch, emitted),
                        "stats": dict(stats),
                        "examples": examples,
                    }
                    pixels, vecs, keys, flds = [], [], [], []
                    stats, examples = Counter(), {}
            # samples left at the end of an epoch are dropped (counted nowhere: they are seen next epoch)
            if emitted == 0:
                raise RuntimeError(f"slot {slot} of rank {s.rank} has no samples to read")
            epoch, skip = epoch + 1, 0

    def _choose(self, choices: dict[str, np.ndarray], rng: random.Random) -> tuple[str, np.ndarray]:
        names = sorted(choices)
        if len(names) == 1:
            return names[0], choices[names[0]]
        w = self.spec.field_weights
        weights = [float(w.get(n, 1.0 if not w else 0.0)) for n in names]
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


def _image_member(sample: dict) -> str:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise KeyError("no image member")


def make_loader(spec: StreamSpec, pin_memory: bool = False, prefetch_factor: int = 4):
    """A DataLoader over `PairedStream`; batch i comes from worker i mod num_workers (in order)."""
    from torch.utils.data import DataLoader

    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if spec.num_workers else {}
    return DataLoader(
        PairedStream(spec), batch_size=None, num_workers=spec.num_workers, pin_memory=pin_memory, **kwargs
    )
