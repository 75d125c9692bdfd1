"""Caption retrieval accuracy (CRA), as the LLM2CLIP paper defines it.

For every image with at least two captions, its first caption is the query and the gallery is the
second caption of every such image; CRA is the share of queries whose nearest gallery caption (cosine
similarity) is their own image's second caption. It measures how well a text encoder alone separates
captions of different images, so it needs no image model. Top-5 is reported beside top-1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from l2c.cache import TextCache
from l2c.eval import search
from l2c.eval.errors import EvalError


def _check_unique(keys: list[str], what: str) -> None:
    dups = [k for k, c in Counter(keys).items() if c > 1]
    if dups:
        raise EvalError(f"{len(dups)} key(s) appear more than once among the {what} captions: {dups[:5]}")


def caption_retrieval_accuracy(
    query_keys: list[str],
    query_vecs: np.ndarray,
    gallery_keys: list[str],
    gallery_vecs: np.ndarray,
    ks: tuple[int, ...] = (1, 5),
    backend: search.Backend = "auto",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """CRA top-K (percent) over the keys that have both a query and a gallery caption.

    Keys with only one of the two are skipped, counted and listed (`n_skipped`, `skipped_keys`).
    """
    _check_unique(query_keys, "query")
    _check_unique(gallery_keys, "gallery")
    g_index = {k: i for i, k in enumerate(gallery_keys)}
    q_set = set(query_keys)
    pairs = [(i, g_index[k]) for i, k in enumerate(query_keys) if k in g_index]
    skipped = [k for k in query_keys if k not in g_index] + [k for k in gallery_keys if k not in q_set]
    if len(pairs) < 2:
        raise EvalError(f"CRA needs at least two images with two captions, found {len(pairs)}")
    qi, gi = (np.array(x, dtype=np.int64) for x in zip(*pairs, strict=True))
    queries = search.l2_normalize(query_vecs[qi])
    gallery = search.l2_normalize(gallery_vecs[gi])  # gallery row j belongs to query j
    _, idx = search.topk(queries, gallery, max(ks), backend=backend, progress=progress)
    hit = idx == np.arange(len(qi))[:, None]
    out = {f"cra_top{k}": float(100.0 * hit[:, :k].any(axis=1).mean()) for k in ks}
    out["n"] = len(qi)
    out["n_skipped"] = len(skipped)
    out["skipped_keys"] = skipped
    return out


def cra_from_cache(
    cache_dir: str | Path,
    query_field: str | None = None,
    gallery_field: str | None = None,
    backend: search.Backend = "auto",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """CRA on a text cache: `query_field` against `gallery_field` (default: the cache's first two fields)."""
    cache = TextCache(cache_dir)
    fields = cache.fields
    if query_field is None or gallery_field is None:
        if len(fields) < 2:
            raise EvalError(
                f"{cache_dir} holds the field(s) {fields}; CRA needs two caption fields per image "
                "(embed e.g. --text-field 'captions[0]' --text-field 'captions[1]')"
            )
        query_field = query_field or fields[0]
        gallery_field = gallery_field or (fields[1] if fields[0] == query_field else fields[0])
    for f in (query_field, gallery_field):
        if f not in fields:
            raise EvalError(f"field {f!r} is not in the cache {cache_dir} (fields: {fields})")
    if query_field == gallery_field:
        raise EvalError(f"query and gallery field are both {query_field!r}; CRA needs two different captions")
    q_keys, _, q_vecs = cache.load([query_field])
    g_keys, _, g_vecs = cache.load([gallery_field])
    out = caption_retrieval_accuracy(q_keys, q_vecs, g_keys, g_vecs, backend=backend, progress=progress)
    out.update(
        query_field=query_field,
        gallery_field=gallery_field,
        text_cache=str(cache_dir),
        model=cache.settings.get("model"),
        model_fingerprint=cache.fingerprint,
        prompt_format=cache.settings.get("prompt_format", "none"),
    )
    return out


def embed_captions_for_cra(
    captions: str | Path,
    model: str,
    cache_dir: str | Path,
    fields: tuple[str, str] = ("captions[0]", "captions[1]"),
    key_field: str = "image_id",
    embed: dict | None = None,
) -> Path:
    """Embed the two caption fields of `captions` into a text cache with the embed-captions pipeline."""
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    options = {k: v for k, v in (embed or {}).items() if v is not None}
    cfg = EmbedConfig(
        sources=[str(captions)],
        out=str(cache_dir),
        model=model,
        text_fields=list(fields),
        key_field=key_field,
        **options,
    )
    run_embed(cfg)
    return Path(cache_dir)


def run_cra(
    text_cache: str | Path | None = None,
    captions: str | Path | None = None,
    model: str | None = None,
    query_field: str | None = None,
    gallery_field: str | None = None,
    key_field: str = "image_id",
    embed: dict | None = None,
    out: str | Path | None = None,
    backend: search.Backend = "auto",
) -> dict:
    """`l2c eval-cra`: CRA of a text cache, or of a captions file embedded with `model` first."""
    if out is not None:  # an unwritable --out fails here, not after the features are computed
        from l2c.storage import Store

        Store(out).check_writable()
    import shutil
    import tempfile

    from l2c.eval import report
    from l2c.progress import track

    tmp = None
    if captions is not None:
        fields = (query_field or "captions[0]", gallery_field or "captions[1]")
        if out is not None:
            cache_dir = Path(out) / "cache"
        else:
            tmp = tempfile.mkdtemp(prefix="l2c-cra-")
            cache_dir = Path(tmp) / "cache"
        report.console.print(
            f"embedding {fields[0]} and {fields[1]} of {captions} with {model} → {cache_dir}"
        )
        text_cache = embed_captions_for_cra(captions, model, cache_dir, fields, key_field, embed)
        query_field, gallery_field = fields
    try:
        cache = TextCache(text_cache)
        with track("caption retrieval", len(cache) // 2, "queries") as advance:
            result = cra_from_cache(text_cache, query_field, gallery_field, backend, advance)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if captions is not None:
        result["captions"] = str(captions)
        if tmp is not None:
            result["text_cache"] = None  # embedded into a temp dir, removed
    report.console.print(report.cra_table(result))
    if result["n_skipped"]:
        report.console.print(
            f"[yellow]{result['n_skipped']} image(s) without both captions skipped: {result['skipped_keys'][:5]}"
        )
    if out is not None:
        report.console.print(f"wrote {report.write_eval_json(out, result)}")
    return result
