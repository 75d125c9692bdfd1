"""The training DataLoader: decoded images (`data.PairedStream`) or a frozen tower's cached features
(`image_cache.CachedFeatureStream`), one batch per step, batch i from data worker i mod num_workers."""

from __future__ import annotations

from l2c.trainer.vision.data import PairedStream, StreamSpec
from l2c.trainer.vision.image_cache import CachedFeatureStream


def make_loader(spec: StreamSpec, pin_memory: bool = False, prefetch_factor: int = 4):
    """A DataLoader over `PairedStream` (or, with `spec.image_cache`, `CachedFeatureStream`), in worker order."""
    from torch.utils.data import DataLoader

    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if spec.num_workers else {}
    stream = (CachedFeatureStream if spec.image_cache else PairedStream)(spec)
    return DataLoader(stream, batch_size=None, num_workers=spec.num_workers, pin_memory=pin_memory, **kwargs)
