"""Image↔text retrieval recall@K over image features and (adapted) caption features.

Texts are paired with images by key. Several captions per image and several caption fields are
allowed; the text gallery holds every caption of the chosen fields. Images without any caption and
captions whose key has no image are errors unless `allow_missing`, in which case they are counted and
listed: captionless images stay in the image gallery as distractors but are not image→text queries,
orphan captions are left out (they have nothing to find).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2c.eval import search
from l2c.eval.errors import EvalError
from l2c.eval.recall import first_hit_ranks, recall_at, recall_curve

CURVE_K = 50


@dataclass
class TextImageMatch:
    text_image: np.ndarray  # image index of each text, -1 when its key has no image
    images_without_text: list[str]
    texts_without_image: list[tuple[str, str]]  # (key, field)


def _preview(items, n: int = 5) -> str:
    items = list(items)
    more = f", … ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


def pair_texts(image_keys: list[str], text_keys: list[str], text_fields: list[str]) -> TextImageMatch:
    """Match captions to images by key; duplicate image keys or (key, field) pairs are errors."""
    dup_images = [k for k, c in Counter(image_keys).items() if c > 1]
    if dup_images:
        raise EvalError(f"{len(dup_images)} duplicate image key(s): {_preview(dup_images)}")
    dup_texts = [kf for kf, c in Counter(zip(text_keys, text_fields, strict=True)).items() if c > 1]
    if dup_texts:
        raise EvalError(
            f"{len(dup_texts)} duplicate (key, field) caption row(s) in the text cache: {_preview(dup_texts)}"
            " (was a source embedded twice into the same cache?)"
        )
    index = {k: i for i, k in enumerate(image_keys)}
    text_image = np.array([index.get(k, -1) for k in text_keys], dtype=np.int64)
    has_text = np.zeros(len(image_keys), bool)
    has_text[text_image[text_image >= 0]] = True
    return TextImageMatch(
        text_image=text_image,
        images_without_text=[k for k, h in zip(image_keys, has_text, strict=True) if not h],
        texts_without_image=[
            (k, f) for k, f, i in zip(text_keys, text_fields, text_image, strict=True) if i < 0
        ],
    )


def _directions(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    text_image: np.ndarray,
    ks: list[int],
    curve_k: int,
    backend: str,
    progress: Callable[[int], None] | None,
) -> dict:
    """Both directions for texts that all have an image (text_image >= 0)."""
    kmax = max(max(ks), curve_k)
    queries = np.unique(text_image)  # images with at least one caption
    _, i2t = search.topk(image_feats[queries], text_feats, kmax, backend=backend, progress=progress)
    i2t_ranks = first_hit_ranks(i2t, text_image, queries)
    _, t2i = search.topk(text_feats, image_feats, kmax, backend=backend, progress=progress)
    t2i_ranks = first_hit_ranks(t2i, np.arange(len(image_feats)), text_image)
    return {
        "image_to_text": recall_at(i2t_ranks, ks),
        "text_to_image": recall_at(t2i_ranks, ks),
        "n_images": int(len(image_feats)),
        "n_image_queries": int(len(queries)),
        "n_texts": int(len(text_feats)),
        "curves": {
            "k": list(range(1, curve_k + 1)),
            "image_to_text": recall_curve(i2t_ranks, curve_k),
            "text_to_image": recall_curve(t2i_ranks, curve_k),
        },
    }


def evaluate_retrieval(
    image_keys: list[str],
    image_feats: np.ndarray,
    text_keys: list[str],
    text_fields: list[str],
    text_feats: np.ndarray,
    ks: list[int] = (1, 5, 10),
    backend: search.Backend = "auto",
    allow_missing: bool = False,
    curve_k: int = CURVE_K,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Recall@K both ways; with several fields also per field. Features should be L2-normalised."""
    if len(image_keys) != len(image_feats) or not len(text_keys) == len(text_fields) == len(text_feats):
        raise EvalError("keys and features disagree in length")
    if image_feats.shape[1] != text_feats.shape[1]:
        raise EvalError(
            f"image features have dim {image_feats.shape[1]}, text features {text_feats.shape[1]}"
        )
    ks = list(ks)
    pairing = pair_texts(image_keys, text_keys, text_fields)
    n_bad = len(pairing.images_without_text) + len(pairing.texts_without_image)
    if n_bad and not allow_missing:
        raise EvalError(
            f"{len(pairing.images_without_text)} image(s) have no caption "
            f"({_preview(pairing.images_without_text)}) and {len(pairing.texts_without_image)} caption(s) "
            f"have no image ({_preview(pairing.texts_without_image)}). Check that images and cache come "
            "from the same data, or pass --allow-missing to evaluate the matched pairs and report the rest."
        )
    keep = pairing.text_image >= 0
    if not keep.any():
        raise EvalError("no caption matches an image key: nothing to evaluate")
    text_feats, text_image = text_feats[keep], pairing.text_image[keep]
    kept_fields = np.asarray(text_fields, dtype=object)[keep]
    curve_k = min(curve_k, len(text_feats), len(image_feats))
    result = _directions(image_feats, text_feats, text_image, ks, curve_k, backend, progress)
    fields = sorted(set(kept_fields), key=list(dict.fromkeys(text_fields)).index)
    result["fields"] = fields
    if len(fields) > 1:
        result["per_field"] = {}
        for f in fields:
            m = kept_fields == f
            r = _directions(
                image_feats, text_feats[m], text_image[m], ks, min(curve_k, int(m.sum())), backend, None
            )
            r.pop("curves")
            result["per_field"][f] = r
    result["missing"] = {
        "images_without_text": len(pairing.images_without_text),
        "texts_without_image": len(pairing.texts_without_image),
        "image_keys": pairing.images_without_text,
        "text_keys": [list(kf) for kf in pairing.texts_without_image],
    }
    return result


def run_retrieval(
    model: str | Path,
    images: list[str],
    text_cache: str | Path,
    ks: list[int] = (1, 5, 10),
    fields: list[str] | None = None,
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    backend: search.Backend = "auto",
    allow_missing: bool = False,
    ray_address: str | None = None,
    use_gpu: bool = False,
) -> dict:
    """`l2c eval-retrieval`: image features from shards, caption features from the cache, recall both ways.

    With `ray_address` the image features are computed by Ray tasks across the cluster (`eval/ray_features.py`).
    """
    if out is not None:  # an unwritable --out fails here, not after the features are computed
        from l2c.storage import Store

        Store(out).check_writable()
    from l2c.cache import TextCache
    from l2c.eval import report
    from l2c.eval.features import count_samples, expand_shards, extract_image_features
    from l2c.eval.model import adapt_texts, check_cache_fits_model, load_model, resolve_device
    from l2c.progress import track

    device = resolve_device(device)
    backend_name = search.resolve_backend(backend)
    cache = TextCache(text_cache)
    net = load_model(model, device)
    check_cache_fits_model(cache, net.meta)
    fields = list(fields or cache.fields)  # a spec as recorded (`json:captions[*]`: every element) or a row name
    cache.field_mask([], fields)  # an unknown field fails here, listing the cache's fields
    shards = expand_shards(images)

    if ray_address:
        from l2c.eval.ray_features import extract_on_ray

        report.console.print(f"image features: {len(shards)} shard(s) on the Ray cluster at {ray_address}")
        img = extract_on_ray(model, shards, batch_size, use_gpu, ray_address)
    else:
        with track(f"image features ({len(shards)} shards)", count_samples(shards), "img") as advance:
            img = extract_image_features(net, shards, batch_size, device, progress=advance)
    if img.skipped:
        report.console.print(f"[yellow]{len(img.skipped)} sample(s) skipped: {img.skipped[:3]}")
    text_keys, text_fields, vecs = cache.load(fields)
    with track("text features (adapter)", len(vecs), "txt") as advance:
        text_feats = adapt_texts(net, vecs, progress=advance)
    with track(f"search ({backend_name})", len(img.keys) + len(text_keys), "queries") as advance:
        res = evaluate_retrieval(
            img.keys, img.features, text_keys, text_fields, text_feats, ks, backend_name, allow_missing,
            progress=advance,
        )  # fmt: skip
    result = {
        "image_to_text": res.pop("image_to_text"),
        "text_to_image": res.pop("text_to_image"),
        "n_images": res.pop("n_images"),
        "n_texts": res.pop("n_texts"),
        **res,
        "skipped_images": {"count": len(img.skipped), "samples": [list(s) for s in img.skipped]},
        "model": str(model),
        "images": shards,
        "text_cache": str(text_cache),
        "text_encoder": cache.settings.get("model"),
        "search_backend": backend_name,
    }
    report.console.print(report.retrieval_table(result))
    if note := report.missing_summary(result):
        report.console.print(note)
    if out is not None:
        path = report.write_eval_json(out, result)
        png = report.plot_recall_curves(result, Path(out) / "recall_curves.png")
        report.console.print(f"wrote {path} and {png}")
    return result
