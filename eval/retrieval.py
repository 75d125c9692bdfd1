"""Image↔text retrieval recall@K over image features and (adapted) caption features.

Texts are paired with images by key. Several captions per image and several caption fields are
allowed; the text gallery holds every caption of the chosen fields. Images without any caption and
captions whose key has no image are errors unless `allow_missing`, in which case they are counted and
listed: captionless images stay in the image gallery as distractors but are not image→text queries,
orphan captions are left out (they have nothing to find).

`eval-retrieval` streams the text side (`caption_gallery`): it reads the key and field columns of the
cache a row group at a time and the vectors of the evaluated images' captions only, adapts them in blocks
and keeps them as float32 up to 1 GiB, float16 above (`gallery_dtype`); captions of other keys are counted (`cache_rows_not_evaluated`), never read, so
a cache many times larger than the evaluated images costs only the reading of its keys. The search then runs
in query batches against gallery blocks (`l2c.eval.search.iter_topk`), each batch's ranks kept, not its
top-k lists. Peak host memory is the image features (float32), the caption features (float16) and one
gallery block; docs/scale.md gives the measured figures.
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
FLOAT32_GALLERY_BYTES = 1 << 30  # caption features up to this size stay float32; a larger gallery is float16


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


def _ranks(queries, gallery, query_group, gallery_group, k, backend, progress, query_rows=None, gallery_rows=None):
    """0-based rank of each query's first hit (k when none in the top k), batch by batch."""
    ranks = np.empty(len(query_group), np.int64)
    for start, _, idx in search.iter_topk(queries, gallery, k, backend=backend, progress=progress,
                                          query_rows=query_rows, gallery_rows=gallery_rows):  # fmt: skip
        ranks[start : start + len(idx)] = first_hit_ranks(idx, gallery_group, query_group[start : start + len(idx)])
    return ranks


def _directions(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    text_image: np.ndarray,
    ks: list[int],
    curve_k: int,
    backend: str,
    progress: Callable[[int], None] | None,
    text_rows: np.ndarray | None = None,
) -> dict:
    """Both directions for the texts `text_rows` (all when None), each with its image `text_image[row]`."""
    kmax = max(max(ks), curve_k)
    groups = text_image if text_rows is None else text_image[text_rows]
    queries = np.unique(groups)  # images with at least one caption
    i2t_ranks = _ranks(image_feats, text_feats, queries, groups, min(kmax, len(groups)), backend, progress,
                       query_rows=queries, gallery_rows=text_rows)  # fmt: skip
    t2i_ranks = _ranks(text_feats, image_feats, groups, np.arange(len(image_feats)), min(kmax, len(image_feats)),
                       backend, progress, query_rows=text_rows)  # fmt: skip
    return {
        "image_to_text": recall_at(i2t_ranks, ks),
        "text_to_image": recall_at(t2i_ranks, ks),
        "n_images": int(len(image_feats)),
        "n_image_queries": int(len(queries)),
        "n_texts": int(len(groups)),
        "curves": {
            "k": list(range(1, curve_k + 1)),
            "image_to_text": recall_curve(i2t_ranks, curve_k),
            "text_to_image": recall_curve(t2i_ranks, curve_k),
        },
    }


def _recall(image_feats, text_feats, text_image, text_field, field_names, ks, curve_k, backend, progress,
            text_rows=None) -> dict:  # fmt: skip
    """Recall both ways over the texts `text_rows` (all when None); with several fields also per field.
    `text_field[row]` indexes `field_names`, listed in the order the result names them."""
    rows = np.arange(len(text_image)) if text_rows is None else text_rows
    if not len(rows):
        raise EvalError("no caption matches an image key: nothing to evaluate")
    curve_k = min(curve_k, len(rows), len(image_feats))
    result = _directions(image_feats, text_feats, text_image, ks, curve_k, backend, progress, text_rows)
    present = set(np.unique(text_field[rows]).tolist())
    fields = [f for i, f in enumerate(field_names) if i in present]
    result["fields"] = fields
    if len(fields) > 1:
        result["per_field"] = {}
        for i, f in enumerate(field_names):
            if i in present:
                sub = rows[text_field[rows] == i]
                r = _directions(image_feats, text_feats, text_image, ks, min(curve_k, len(sub)), backend, None, sub)
                r.pop("curves")
                result["per_field"][f] = r
    return result


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
    _check_dims(image_feats, text_feats)
    ks = list(ks)
    pairing = pair_texts(image_keys, text_keys, text_fields)
    _refuse_missing(pairing.images_without_text, pairing.texts_without_image, allow_missing)
    names = list(dict.fromkeys(text_fields))
    code = {f: i for i, f in enumerate(names)}
    text_field = np.array([code[f] for f in text_fields], np.int32)
    keep = np.flatnonzero(pairing.text_image >= 0)
    result = _recall(image_feats, text_feats, pairing.text_image, text_field, names, ks, curve_k, backend, progress,
                     None if len(keep) == len(text_keys) else keep)  # fmt: skip
    result["missing"] = _missing(pairing.images_without_text, pairing.texts_without_image)
    return result


def _check_dims(image_feats: np.ndarray, text_feats: np.ndarray) -> None:
    if image_feats.shape[1] != text_feats.shape[1]:
        raise EvalError(f"image features have dim {image_feats.shape[1]}, text features {text_feats.shape[1]}")


def _refuse_missing(images_without_text: list[str], texts_without_image: list, allow_missing: bool) -> None:
    if (images_without_text or texts_without_image) and not allow_missing:
        what = [f"{len(images_without_text)} image(s) have no caption ({_preview(images_without_text)})"] * bool(
            images_without_text) + [f"{len(texts_without_image)} caption(s) have no image "
                                    f"({_preview(texts_without_image)})"] * bool(texts_without_image)  # fmt: skip
        raise EvalError(
            f"{' and '.join(what)}. Check that images and cache come from the same data, or pass --allow-missing "
            "to evaluate the matched pairs and report the rest."
        )


def _missing(images_without_text: list[str], texts_without_image: list) -> dict:
    return {
        "images_without_text": len(images_without_text),
        "texts_without_image": len(texts_without_image),
        "image_keys": list(images_without_text),
        "text_keys": [list(kf) for kf in texts_without_image],
    }


@dataclass
class CaptionGallery:
    """The captions of the evaluated images, adapted: the text side of the search, in cache order."""

    feats: np.ndarray  # [n, embed_dim] float32, or float16 for a large gallery (`gallery_dtype`); L2-normalised
    image: np.ndarray  # [n] the index of each caption's image
    field: np.ndarray  # [n] each caption's field, an index into `fields`
    fields: list[str]  # row field names, in the order first met
    other_rows: int  # cache rows of the chosen fields whose key is no evaluated image (not read)


def gallery_dtype(n_captions: int, embed_dim: int, dtype: str = "auto"):
    """The caption features' dtype: `auto` keeps float32 while they fit in `FLOAT32_GALLERY_BYTES` (figures equal
    to the float32 computation to the last query), float16 above (half the memory; equal scores may then break
    otherwise: on the demo's short captions, 95 of 500 alike, 4 image queries of 500 moved)."""
    if dtype == "auto":
        return np.float32 if n_captions * embed_dim * 4 <= FLOAT32_GALLERY_BYTES else np.float16
    if dtype not in ("float16", "float32"):
        raise EvalError(f"caption features dtype must be auto, float16 or float32, got {dtype!r}")
    return np.dtype(dtype).type


def caption_gallery(cache, image_keys: list[str], fields: list[str] | None, net, dtype: str = "auto",
                    progress: Callable[[int], None] | None = None) -> CaptionGallery:  # fmt: skip
    """The evaluated images' captions from `cache` (`TextCache`): found by key, vectors read a row group at a
    time and adapted by `net` in blocks into one array (`gallery_dtype`). A (key, field) twice is an error."""
    from l2c.eval.model import adapt_texts

    found = cache.find_keys(image_keys, fields)
    pair = found.key_index * max(1, len(found.fields)) + found.field_index
    uniq, counts = np.unique(pair, return_counts=True)
    if (counts > 1).any():
        dups = [(image_keys[p // len(found.fields)], found.fields[p % len(found.fields)]) for p in uniq[counts > 1]]
        raise EvalError(f"{len(dups)} duplicate (key, field) caption row(s) in the text cache: {_preview(dups)}"
                        " (was a source embedded twice into the same cache?)")  # fmt: skip
    feats = np.empty((len(found), net.meta.embed_dim), gallery_dtype(len(found), net.meta.embed_dim, dtype))
    start = 0
    for vecs in cache.read_vectors(found):
        adapt_texts(net, vecs, progress=progress, out=feats[start : start + len(vecs)])
        start += len(vecs)
    return CaptionGallery(feats, found.key_index, found.field_index, found.fields, found.other_rows)


def evaluate_gallery(
    image_keys: list[str],
    image_feats: np.ndarray,
    texts: CaptionGallery,
    ks: list[int] = (1, 5, 10),
    backend: search.Backend = "auto",
    allow_missing: bool = False,
    curve_k: int = CURVE_K,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """`evaluate_retrieval` for a `caption_gallery`: its captions all belong to evaluated images, so only
    images without a caption can be missing."""
    _check_dims(image_feats, texts.feats)
    has_text = np.zeros(len(image_keys), bool)
    has_text[texts.image] = True
    without = [k for k, h in zip(image_keys, has_text, strict=True) if not h]
    _refuse_missing(without, [], allow_missing)
    result = _recall(image_feats, texts.feats, texts.image, texts.field, texts.fields, list(ks), curve_k, backend,
                     progress)  # fmt: skip
    result["missing"] = _missing(without, [])
    result["cache_rows_not_evaluated"] = int(texts.other_rows)
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
    text_dtype: str = "auto",
) -> dict:
    """`l2c eval-retrieval`: image features from shards, caption features from the cache, recall both ways.

    With `ray_address` the image features are computed by Ray tasks across the cluster (`eval/ray_features.py`).
    `text_dtype`: the caption features' dtype (`gallery_dtype`: auto, float16, float32).
    """
    if out is not None:  # an unwritable --out fails here, not after the features are computed
        from l2c.storage import Store

        Store(out).check_writable()
    from l2c.cache import TextCache
    from l2c.eval import report
    from l2c.eval.features import count_samples, expand_shards, extract_image_features
    from l2c.eval.model import check_cache_fits_model, load_model, resolve_device
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
    with track("text features (captions of these images, adapter)", None, "txt") as advance:
        texts = caption_gallery(cache, img.keys, fields, net, text_dtype, progress=advance)
    with track(f"search ({backend_name})", len(img.keys) + len(texts.image), "queries") as advance:
        res = evaluate_gallery(img.keys, img.features, texts, ks, backend_name, allow_missing, progress=advance)
    if net.meta.nested_dims:  # a Matryoshka model: recall at each dim it was trained at
        from l2c.eval.nested import recall_by_dim

        res["nested"] = recall_by_dim(img.keys, img.features, texts, net.meta.nested_dims, ks, backend_name, allow_missing)
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
        "caption_features_dtype": np.dtype(texts.feats.dtype).name,
    }
    report.console.print(report.retrieval_table(result))
    if note := report.missing_summary(result):
        report.console.print(note)
    if out is not None:
        path = report.write_eval_json(out, result)
        png = report.plot_recall_curves(result, Path(out) / "recall_curves.png")
        report.console.print(f"wrote {path} and {png}")
    return result
