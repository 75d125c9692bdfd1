"""Zero-shot classification with a trained model, as in CLIP.

Every class name goes through every prompt template ("a photo of a {}."), the text encoder the
model's text cache was made with (the teacher spec recorded in the model's metadata, `meta.teacher`)
and the model's adapter; per class the adapted prompt embeddings are averaged (normalise, mean,
normalise), as open_clip's `build_zero_shot_classifier` does. An image is classified by its most
similar class embedding.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from l2c.eval.errors import EvalError
from l2c.eval.search import l2_normalize
from l2c.teacher import TeacherSpec

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines, stripped; lines starting with `#` are comments."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"{p} does not exist")
    return [
        ln.strip()
        for ln in p.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]


def load_classes(path: str | Path) -> list[str]:
    classes = read_lines(path)
    if len(classes) < 2:
        raise EvalError(
            f"{path}: zero-shot classification needs at least two class names, found {len(classes)}"
        )
    dups = [c for c, n in Counter(classes).items() if n > 1]
    if dups:
        raise EvalError(f"{path}: class name(s) listed more than once: {dups}")
    return classes


def load_templates(path: str | Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path)
    if not templates:
        raise EvalError(f"{path} holds no templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise EvalError(f"{path}: every template needs exactly one {{}} for the class name; not: {bad[:3]}")
    return templates


def load_text_encoder(teacher: TeacherSpec | None, text_model: str | Path | None = None, device: str | None = None,
                      prompt_format: str | None = None):  # fmt: skip
    """The teacher a model was trained on (its `meta.teacher`), found on this machine (`text_model` where it moved;
    its fingerprint is checked) and built as it ran. A model that records no teacher (a released model) takes
    `text_model` with its own settings and `prompt_format`."""
    from l2c.teacher import TeacherMismatch, build_text_encoder, locate, resolve_teacher

    if teacher is None:
        if not text_model:
            raise EvalError("the model records no text teacher (a released model): pass --text-model")
        spec = resolve_teacher(text_model, prompt_format=prompt_format, device_type=str(device or "cpu").split(":")[0])
    else:
        spec = locate(teacher, text_model)
        if prompt_format is not None and prompt_format != spec.prompt_format:
            raise TeacherMismatch(
                f"--prompt-format {prompt_format}: the model's teacher ran with prompt format {spec.prompt_format!r}, "
                "and class prompts must be embedded as its captions were; leave --prompt-format out"
            )
    return build_text_encoder(spec, device)


def build_classifier(model, encoder, classes: list[str], templates: list[str]) -> np.ndarray:
    """Class embeddings [n_classes, embed_dim]: templates → text encoder → adapter → normalise, mean, normalise."""
    from l2c.eval.model import adapt_texts

    prompts = [t.format(c) for c in classes for t in templates]
    vectors = encoder.encode(prompts)
    if vectors.shape[1] != model.meta.text_dim:
        raise EvalError(
            f"text encoder gives {vectors.shape[1]}-d vectors, the adapter takes {model.meta.text_dim}"
        )
    emb = adapt_texts(model, vectors).reshape(len(classes), len(templates), -1)
    return l2_normalize(l2_normalize(emb).mean(axis=1))


def label_indices(values: list, classes: list[str], label_field: str) -> tuple[np.ndarray, list[int]]:
    """Labels (class names, or indices into `classes`) → (indices, -1 where absent; positions without label)."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.full(len(values), -1, np.int64)
    unknown: Counter = Counter()
    missing = []
    for i, v in enumerate(values):
        if v is None or v == "":
            missing.append(i)
        elif isinstance(v, str) and v in index:
            out[i] = index[v]
        elif isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            j = int(v)
            if not 0 <= j < len(classes):
                unknown[v] += 1
            out[i] = j
        else:
            unknown[v] += 1
    if unknown:
        raise EvalError(
            f"{sum(unknown.values())} image(s) have labels ({label_field}) that are not in the class list: "
            f"{dict(unknown.most_common(5))}; classes are {classes[:10]}{' …' if len(classes) > 10 else ''}"
        )
    return out, missing


def zeroshot_metrics(
    image_feats: np.ndarray,
    labels: np.ndarray,
    classifier: np.ndarray,
    classes: list[str],
    top_confused: int = 10,
) -> dict:
    """Top-1/top-5 accuracy (percent), per-class accuracy, confusion matrix and the most confused pairs."""
    logits = image_feats @ classifier.T
    k = min(5, len(classes))  # with fewer than 5 classes "top5" is top-n (100%)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    pred = top[:, 0]
    n = len(classes)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    per_class = {
        c: (float(100.0 * confusion[i, i] / support[i]) if support[i] else None)
        for i, c in enumerate(classes)
    }
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top_confused]
    pairs = [
        {
            "true": classes[t],
            "predicted": classes[p],
            "count": int(off[t, p]),
            "percent": float(100.0 * off[t, p] / support[t]),
        }
        for t, p in zip(*np.unravel_index(order, off.shape), strict=True)
        if off[t, p] > 0
    ]
    return {
        "top1": float(100.0 * np.mean(pred == labels)),
        # top-5 means something only with more than 5 classes (else every image scores 100%)
        "top5": float(100.0 * np.mean((top == labels[:, None]).any(axis=1))) if n > 5 else None,
        "n_images": int(len(labels)),
        "n_classes": n,
        "per_class_accuracy": per_class,
        "most_confused": pairs,
        "confusion_matrix": confusion.tolist(),
    }


def run_zeroshot(
    model: str | Path,
    images: list[str],
    classes_file: str | Path,
    templates_file: str | Path | None = None,
    label_field: str = "json:label",
    text_model: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    top_confused: int = 10,
    prompt_format: str | None = None,
) -> dict:
    """`l2c eval-zeroshot`: classify labelled image shards by class-name prompts."""
    if out is not None:  # an unwritable --out fails here, not after the features are computed
        from l2c.storage import Store

        Store(out).check_writable()
    from l2c.eval import report
    from l2c.eval.features import count_samples, expand_shards, extract_image_features
    from l2c.eval.model import load_model, resolve_device
    from l2c.progress import track

    device = resolve_device(device)
    classes = load_classes(classes_file)
    templates = load_templates(templates_file)
    shards = expand_shards(images)
    net = load_model(model, device)
    encoder = load_text_encoder(net.meta.teacher, text_model, device, prompt_format)
    report.console.print(
        f"{len(classes)} classes × {len(templates)} template(s) through {encoder.info.get('path', '')}"
    )
    classifier = build_classifier(net, encoder, classes, templates)
    encoder_format = encoder.prompt_format
    del encoder
    with track(f"image features ({len(shards)} shards)", count_samples(shards), "img") as advance:
        img = extract_image_features(net, shards, batch_size, device, fields=(label_field,), progress=advance)
    labels, missing = label_indices(img.values[label_field], classes, label_field)
    keep = labels >= 0
    if not keep.any():
        raise EvalError(
            f"none of the {len(labels)} image(s) has a label in {label_field!r} naming one of the "
            f"{len(classes)} classes (e.g. {classes[:3]}): check --label-field and the classes file"
        )
    result = zeroshot_metrics(img.features[keep], labels[keep], classifier, classes, top_confused)
    result = {
        "top1": result.pop("top1"),
        "top5": result.pop("top5", None),
        **result,
        "n_skipped": len(missing) + len(img.skipped),
        "skipped": {
            "no_label": [img.keys[i] for i in missing],
            "no_image": [list(s) for s in img.skipped],
        },
        "classes": classes,
        "templates": templates,
        "label_field": label_field,
        "prompt_format": encoder_format,
        "model": str(model),
        "images": shards,
    }
    report.console.print(report.zeroshot_table(result))
    if result["most_confused"]:
        report.console.print(report.confused_pairs_table(result["most_confused"]))
    if result["n_skipped"]:
        report.console.print(
            f"[yellow]{len(missing)} image(s) without a label ({label_field}) and {len(img.skipped)} sample(s) "
            "without a decodable image were skipped (listed in eval.json[skipped])"
        )
    if out is not None:
        path = report.write_eval_json(out, result)
        png = report.plot_confusion(
            np.array(result["confusion_matrix"]), classes, Path(out) / "confusion_matrix.png"
        )
        report.console.print(f"wrote {path} and {png}")
    return result
