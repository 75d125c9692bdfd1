"""Caption retrieval accuracy of the model being trained, on captions files (the `eval-cra` definition)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from l2c.data.records import read_records
from l2c.trainer.text.data import CAPTION_FIELDS, KEY_FIELDS, PairDataError


@dataclass
class CraSet:
    """Caption 1 of each image (queries) and caption 2 of each image (gallery), in file order."""

    name: str
    keys: list[str]
    queries: list[str]
    gallery: list[str]

    def head(self, n: int) -> CraSet:
        return self if n <= 0 or n >= len(self.keys) else CraSet(self.name, self.keys[:n], self.queries[:n], self.gallery[:n])


def load_cra_set(path: str | Path, name: str | None = None) -> CraSet:
    """Images with at least two captions; records with fewer are left out (as eval-cra does)."""
    path = Path(path)
    keys, queries, gallery = [], [], []
    for rec in read_records(path):
        kf = next((f for f in KEY_FIELDS if f in rec), None)
        cf = next((f for f in CAPTION_FIELDS if f in rec), None)
        caps = rec.get(cf) if cf else None
        if kf is None or not isinstance(caps, list) or len(caps) < 2:
            continue
        keys.append(str(rec[kf]))
        queries.append(str(caps[0]))
        gallery.append(str(caps[1]))
    if len(keys) < 2:
        raise PairDataError(f"{path}: CRA needs at least two images with two captions, found {len(keys)}")
    return CraSet(name or path.name.split(".")[0], keys, queries, gallery)


def measure_cra(encoder, cra_set: CraSet) -> dict:
    """CRA top-1/top-5 (percent) of a `TextEncoder` (normalised vectors) on `cra_set`."""
    from l2c.eval.cra import caption_retrieval_accuracy

    q = encoder.encode(cra_set.queries)
    g = encoder.encode(cra_set.gallery)
    out = caption_retrieval_accuracy(cra_set.keys, q, cra_set.keys, g)
    return {"cra_top1": out["cra_top1"], "cra_top5": out["cra_top5"], "n": out["n"]}
