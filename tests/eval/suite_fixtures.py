"""Evaluation sets in their official layouts, filled with the real photos of ../shared/data.

The suite tests build small ones; `python -m tests.eval.suite_fixtures DIR` writes larger ones for a look at
`l2c eval-suite`'s output (they are not the benchmarks: Flickr8k dev photos stand in for Flickr30k, Urban-1k
and DOCCI, with the five captions joined as the long caption; COCO mini photos for COCO).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def read_photos(name: str, shared: Path = SHARED) -> tuple[Path, list[dict]]:
    d = shared / name
    return d, [json.loads(x) for x in (d / "captions.jsonl").read_text().splitlines() if x.strip()]


def write_urban1k(photos, root: Path, n: int = 5, start: int = 1) -> None:
    """Urban1k/image/N.jpg + Urban1k/caption/N.txt (the caption is the first line)."""
    d, recs = photos
    (root / "caption").mkdir(parents=True)
    for i in range(1, n + 1):
        r = recs[start + i - 1]
        link(d / r["file_name"], root / "image" / f"{i}.jpg")
        (root / "caption" / f"{i}.txt").write_text(" ".join(r["captions"]) + "\n")


def write_docci(photos, root: Path, start: int = 10, n_test: int = 4, n_train: int = 2) -> None:
    """docci/docci_descriptions.jsonlines (example_id, split, image_file, description) + docci/images/."""
    d, recs = photos
    lines = []
    for i, r in enumerate(recs[start : start + n_test + n_train]):
        split = "test" if i < n_test else "train"
        ex = f"{split}_{i:05d}"
        link(d / r["file_name"], root / "images" / f"{ex}.jpg")
        lines.append(json.dumps({"example_id": ex, "split": split, "image_file": f"{ex}.jpg",
                                 "description": " ".join(r["captions"])}))
    (root / "docci_descriptions.jsonlines").write_text("\n".join(lines) + "\n")


def write_imagenet(photos, root: Path, start: int = 20, per_class: int = 2) -> None:
    """imagenet/val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG, `per_class` images per class."""
    d, recs = photos
    for c, wnid in enumerate(WNIDS):
        for j in range(per_class):
            n = per_class * c + j
            link(d / recs[start + n]["file_name"], root / "val" / wnid / f"ILSVRC2012_val_{n + 1:08d}.JPEG")


def write_retrieval_json(photos, root: Path, name: str, start: int, n: int, image_key: str = "file_name") -> Path:
    """The BLIP-style test file (`[{image, caption: [...]}]`) over `root/images/`."""
    d, recs = photos
    items = []
    for r in recs[start : start + n]:
        link(d / r[image_key], root / "images" / r[image_key])
        items.append({"image": f"images/{r[image_key]}", "caption": r["captions"]})
    (root / name).write_text(json.dumps(items))
    return root / name


def main(argv: list[str]) -> int:
    """DIR: flickr30k (600 Flickr8k dev photos), coco (the 159 COCO photos), Urban1k and docci (200 other
    dev photos each); no ImageNet or ShareGPT4V folder, so the suite lists them as skipped."""
    root = Path(argv[0])
    flickr, coco = read_photos("flickr8k_dev_photos"), read_photos("coco_mini_val2017")
    write_retrieval_json(flickr, root / "flickr30k", "flickr30k_test.json", 0, 600)
    write_retrieval_json(coco, root / "coco", "coco_karpathy_test.json", 0, len(coco[1]), image_key="file")
    write_urban1k(flickr, root / "Urban1k", n=200, start=600)
    write_docci(flickr, root / "docci", start=800, n_test=200, n_train=0)
    print(f"wrote {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
