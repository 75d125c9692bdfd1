"""`l2c eval-suite`: every evaluation set of a suite config (`configs/eval/llm2clip.yaml`) in one run.

For each set found under `--data DIR` (a folder per set: shards already made, or the set as it ships,
converted with the `make-shards --format` importers into `OUT/shards/SET`):

- retrieval sets: the captions are embedded with the model's own teacher, with the settings recorded in the
  export (`meta.teacher`, `l2c.teacher`), by the `embed-captions` job into `OUT/text/SET`; then `run_retrieval`
  (the `eval-retrieval` code) gives recall@K both ways, written to `OUT/sets/SET/`. A set with `cra: true`
  also gets CRA on its first two captions, from the same cache.
- zero-shot sets: class names through the OpenAI ImageNet templates, the teacher and the adapter
  (`eval.zeroshot.build_classifier`); top-1 and top-5.

Shards and caches under OUT are reused by the next run (a set's cache is re-embedded only when its shards
were re-made or the teacher changed). Output: `OUT/suite.json`, `OUT/suite.md` (the paper's layout: a row per
model, I2T / T2I R@1 per set) and `OUT/suite.png`; `--compare OTHER_OUT` adds another run's results and the
differences. Sets not found are listed with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import typer

from l2c.config import ConfigError
from l2c.eval import report
from l2c.eval.errors import EvalError
from l2c.meta import ModelMeta

DEFAULT_SUITE = "eval/llm2clip"
SUITE_JSON, SUITE_MD, SUITE_PNG = "suite.json", "suite.md", "suite.png"
# what eval-suite writes in its --out: a folder holding only these is its own earlier output
OUT_NAMES = (SUITE_JSON, SUITE_MD, SUITE_PNG, "shards", "text", "sets")
TASKS = ("retrieval", "zeroshot")


# ------------------------------------------------------------------------------------------- config


@dataclass
class Layout:
    """One way a set ships: the `make-shards --format` importer, its annotation file and image root."""

    format: str
    images: str = "."  # image root, relative to the set's folder
    annotation: str | None = None  # the `--captions` file, relative to the set's folder
    subset: str | None = None  # the importer's `--subset` (None: its default)

    def validate(self) -> None:
        from l2c.data.importers import FORMATS

        if self.format not in FORMATS:
            raise ConfigError(f"layout format {self.format!r} is not one of {', '.join(FORMATS)}")


@dataclass
class SetSpec:
    name: str  # id: OUT/shards/NAME, OUT/text/NAME, OUT/sets/NAME
    title: str  # column heading in suite.md
    folder: str  # the set's folder under --data
    layouts: list[Layout] = field(default_factory=list)  # tried in order; the first whose files are there
    task: str = "retrieval"  # retrieval | zeroshot
    text_fields: list[str] = field(default_factory=lambda: ["json:captions[*]"])  # caption fields embedded
    cra: bool = False  # also caption retrieval accuracy (first caption against every image's second)
    cra_fields: list[str] = field(default_factory=lambda: ["json:captions[0]", "json:captions[1]"])

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ConfigError(f"set name {self.name!r}: letters, digits, '_' and '-' only")
        if self.task not in TASKS:
            raise ConfigError(f"set {self.name}: task must be one of {TASKS}, got {self.task!r}")
        if self.cra and len(self.cra_fields) != 2:
            raise ConfigError(f"set {self.name}: cra_fields must name two fields (query, gallery)")


@dataclass
class ZeroShotSpec:
    classnames: str = "imagenet_classnames.txt"  # "<wnid> <name>" lines in label order (relative to the config)
    templates: str = "imagenet_templates.txt"  # one template a line with {} (relative to the config)
    label_field: str = "json:folder"  # where a sample's class id (the wnid) is


@dataclass
class SuiteConfig:
    name: str = "llm2clip"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    sets: list[SetSpec] = field(default_factory=list)
    zeroshot: ZeroShotSpec = field(default_factory=ZeroShotSpec)

    def validate(self) -> None:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"set names must be unique: {names}")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"ks must be positive cut-offs, got {self.ks}")


def load_suite(path: str | Path = DEFAULT_SUITE) -> tuple[SuiteConfig, Path]:
    """The suite config and the folder its relative data files are in."""
    from l2c.config import load_config, resolve_config_path

    return load_config(SuiteConfig, path), resolve_config_path(path).resolve().parent


def read_classnames(path: Path) -> tuple[list[str], list[str]]:
    """`<wnid> <name>` lines (`#` comments) → (wnids, names), in label order."""
    if not path.is_file():
        raise EvalError(f"class-names file {path} does not exist")
    pairs = [ln.split(None, 1) for ln in path.read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.startswith("#")]  # fmt: skip
    bad = [" ".join(p) for p in pairs if len(p) != 2]
    if bad or len(pairs) < 2:
        raise EvalError(f"{path}: expected '<class id> <name>' lines (at least two), not {bad[:3]}")
    ids = [p[0] for p in pairs]
    if len(set(ids)) != len(ids):
        raise EvalError(f"{path}: a class id is listed twice")
    return ids, [p[1].strip() for p in pairs]


# ------------------------------------------------------------------------------------------ shards


def _tars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


def find_shards(spec: SetSpec, data: Path, out: Path, zs_classes: Path | None) -> tuple[Path | None, dict]:
    """The set's shards: already made in its folder, or converted from the first layout found (reused when
    made before from the same inputs). Returns (shards dir or None, info); info["skipped"] says why not."""
    from l2c.data.make_shards import MakeShardsConfig, MakeShardsError, make_shards

    folder = data / spec.folder
    if not folder.is_dir():
        return None, {"skipped": f"no folder {folder}"}
    if _tars(folder):
        return folder, {"dir": str(folder), "source": "shards", "made": False}
    tried = []
    for lay in spec.layouts:
        images = folder / lay.images
        ann = folder / lay.annotation if lay.annotation else None
        if not images.is_dir() or (ann is not None and not ann.exists()):
            missing = ann if ann is not None and not ann.exists() else images
            tried.append(f"{missing.relative_to(folder)} ({lay.format})")
            continue
        dest = out / "shards" / spec.name
        cfg = MakeShardsConfig(format=lay.format, subset=lay.subset)
        try:
            if lay.format == "imagenet" and ann is None:
                ann = _imagenet_names(images, zs_classes, out / "shards" / f"{spec.name}-classnames.txt")
            info = make_shards(images, ann, dest, cfg, overwrite=True)
        except (MakeShardsError, EvalError) as e:
            return None, {"skipped": f"{lay.format} layout in {folder} could not be converted: {e}"}
        if not info.get("written"):
            return None, {"skipped": f"make-shards --format {lay.format} wrote nothing from {folder} "
                                     f"(rejects: {info.get('rejected_by_reason')})"}  # fmt: skip
        return dest, {"dir": str(dest), "source": f"{lay.format}: {folder}", "made": not info.get("skipped"),
                      "written": info["written"], "rejected": info.get("rejected", 0)}  # fmt: skip
    return None, {"skipped": f"{folder} holds no shards (*.tar) and no known layout: missing " + " or ".join(tried)}


def _imagenet_names(images: Path, classnames: Path | None, dest: Path) -> Path:
    """The importer's `<folder> <name>` file for the class folders present, from the suite's class names."""
    from l2c import atomic

    if classnames is None:
        raise EvalError("an imagenet layout without annotation needs the suite's zeroshot.classnames")
    ids, names = read_classnames(classnames)
    name_of = dict(zip(ids, names, strict=True))
    folders = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [f for f in folders if f not in name_of]
    if unknown:
        raise EvalError(f"{images}: class folder(s) {unknown[:5]} are not among the classes of {classnames}")
    atomic.write_text(dest, "".join(f"{f} {name_of[f]}\n" for f in folders))
    return dest


# ------------------------------------------------------------------------------------- text caches


def teacher_options(meta: ModelMeta) -> dict:
    """`EmbedConfig` fields that embed captions exactly as the model's teacher did (`meta.teacher`, found on this
    machine with its fingerprint checked)."""
    from l2c.teacher import locate

    if meta.teacher is None:
        raise EvalError("the model records no text teacher (a released model): cannot embed its captions")
    t = locate(meta.teacher)
    return {"model": t.model_path, "lora": t.lora, "engine": t.engine, "pooling": t.pooling, "normalize": t.normalize,
            "max_length": t.max_length, "dtype": t.dtype, "store_dtype": t.store_dtype, "instruction": t.instruction,
            "bidirectional": t.bidirectional if t.is_decoder else None, "prompt_format": t.prompt_format}  # fmt: skip


class _Ray:
    """One local Ray for all the sets' embedding jobs, started on first need."""

    started = False

    @classmethod
    def ensure(cls) -> None:
        from l2c.ray_utils import init_ray

        cls.started = init_ray() or cls.started

    @classmethod
    def stop(cls) -> None:
        if cls.started:
            import ray

            ray.shutdown()
            cls.started = False


def _stamp(tars: list[Path]) -> dict:
    return {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in tars}


def ensure_cache(shards: Path, cache_dir: Path, fields: list[str], meta: ModelMeta, fresh_shards: bool) -> dict:
    """The set's caption cache, embedded with the model's teacher unless one made from these very shards (same
    files, sizes, mtimes: `OUT/text/SET.shards.json`) with the same teacher and fields is there.
    Returns {"dir", "embedded", "rows"}."""
    import shutil

    from l2c import atomic
    from l2c.cache import MANIFEST, TextCache
    from l2c.pipeline.sources import expand_sources

    tars = _tars(shards)
    sources = expand_sources([str(p) for p in tars])  # not the folder: its rejected.jsonl is no source
    stamp_file = cache_dir.with_name(f"{cache_dir.name}.shards.json")
    if (cache_dir / MANIFEST).exists() and stamp_file.exists() and not fresh_shards:
        cache = TextCache(cache_dir)
        if (meta.teacher is not None and cache.teacher.identity() == meta.teacher.identity()
                and cache.fields == list(fields)
                and json.loads(stamp_file.read_text()) == _stamp(tars)
                and all(cache.shard_for_source(s) for s in sources)):  # fmt: skip
            return {"dir": str(cache_dir), "embedded": False, "rows": len(cache)}
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    _Ray.ensure()
    cfg = EmbedConfig(sources=sources, out=str(cache_dir), text_fields=list(fields), overwrite=True,
                      **teacher_options(meta))  # fmt: skip
    stale = fresh_shards or (stamp_file.exists() and json.loads(stamp_file.read_text()) != _stamp(tars))
    if stale and cache_dir.exists():  # made from other shards: embedded afresh (an interrupted one resumes)
        shutil.rmtree(cache_dir)
    run_embed(cfg)
    atomic.write_json(stamp_file, _stamp(tars))
    return {"dir": str(cache_dir), "embedded": True, "rows": len(TextCache(cache_dir))}


# ----------------------------------------------------------------------------------------- the runs


def _cra(cache_dir: Path, fields: list[str], backend: str) -> dict:
    from l2c.cache import TextCache
    from l2c.eval.cra import caption_retrieval_accuracy

    cache = TextCache(cache_dir)
    q_keys, _, q = cache.load([fields[0]])
    g_keys, _, g = cache.load([fields[1]])
    res = caption_retrieval_accuracy(q_keys, q, g_keys, g, backend=backend)
    res.pop("skipped_keys")
    return {**res, "query_field": fields[0], "gallery_field": fields[1]}


def _zeroshot(net, shards: Path, zs: ZeroShotSpec, base: Path, batch_size: int, device: str) -> dict:
    import numpy as np

    from l2c.eval.features import count_samples, expand_shards, extract_image_features
    from l2c.eval.zeroshot import build_classifier, load_templates, load_text_encoder, zeroshot_metrics
    from l2c.progress import track

    ids, names = read_classnames(base / zs.classnames)
    templates = load_templates(base / zs.templates)
    encoder = load_text_encoder(net.meta.teacher, None, device)
    report.console.print(f"{len(names)} classes × {len(templates)} templates through {encoder.info.get('path', '')}")
    classifier = build_classifier(net, encoder, names, templates)
    del encoder
    tars = expand_shards([str(p) for p in _tars(shards)])
    with track(f"image features ({len(tars)} shards)", count_samples(tars), "img") as advance:
        img = extract_image_features(net, tars, batch_size, device, fields=(zs.label_field,), progress=advance)
    index = {c: i for i, c in enumerate(ids)}
    values = img.values[zs.label_field]
    labels = np.array([index.get(str(v), -1) for v in values], np.int64)
    unknown = sorted({str(v) for v, lab in zip(values, labels, strict=True) if lab < 0})
    if unknown:
        raise EvalError(f"{len(unknown)} class id(s) in {zs.label_field} are not in {zs.classnames}: {unknown[:5]}")
    res = zeroshot_metrics(img.features, labels, classifier, names, top_confused=10)
    return {"top1": res["top1"], "top5": res["top5"], "n_images": res["n_images"], "n_classes": res["n_classes"],
            "n_templates": len(templates), "most_confused": res["most_confused"],
            "n_skipped": len(img.skipped)}  # fmt: skip


def _model_name(model: str | Path) -> str:
    p = Path(str(model).rstrip("/"))
    return p.parent.name if p.name == "export" else p.name


def run_suite(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    suite: str | Path = DEFAULT_SUITE,
    compare: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    backend: str = "auto",
) -> dict:
    """`l2c eval-suite`: every set of the suite found under `data`; writes OUT/suite.{json,md,png}."""
    from l2c import atomic
    from l2c.eval import search as search_mod
    from l2c.eval.model import load_model, resolve_device
    from l2c.eval.retrieval import run_retrieval

    cfg, base = load_suite(suite)
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise EvalError(f"--data {data} is not a directory")
    other = _load_other(compare) if compare is not None else None
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    backend = search_mod.resolve_backend(backend)
    net = load_model(model, device)
    meta = net.meta
    zs_classes = base / cfg.zeroshot.classnames
    result: dict = {"suite": cfg.name, "suite_config": str(suite), "model": str(model), "model_name": _model_name(model),
                    "data": str(data), "text_encoder": meta.teacher.model if meta.teacher else None,
                    "ks": list(cfg.ks), "sets": {}, "skipped": {}, "n_embedded": 0, "n_shards_made": 0}  # fmt: skip
    try:
        for i, spec in enumerate(cfg.sets, 1):
            report.console.rule(f"[{i}/{len(cfg.sets)}] {spec.title} ({spec.name})")
            shards, sinfo = find_shards(spec, data, out, zs_classes)
            if shards is None:
                result["skipped"][spec.name] = sinfo["skipped"]
                report.console.print(f"[yellow]skipped {spec.name}: {sinfo['skipped']}")
                continue
            result["n_shards_made"] += int(bool(sinfo.get("made")))
            entry = {"title": spec.title, "task": spec.task, "shards": sinfo}
            if spec.task == "zeroshot":
                entry["zeroshot"] = _zeroshot(net, shards, cfg.zeroshot, base, batch_size, device)
                report.console.print(report.zeroshot_table(entry["zeroshot"]))
            else:
                text = ensure_cache(shards, out / "text" / spec.name, spec.text_fields, meta, bool(sinfo.get("made")))
                result["n_embedded"] += int(text["embedded"])
                report.console.print(f"captions: {text['rows']} vectors in {text['dir']} "
                                     f"({'embedded now' if text['embedded'] else 'cache reused'})")  # fmt: skip
                res = run_retrieval(model, [str(p) for p in _tars(shards)], text["dir"], cfg.ks, None, out / "sets" / spec.name,
                                    batch_size, device, backend, allow_missing=True)  # fmt: skip
                entry.update(text_cache=text, image_to_text=res["image_to_text"], text_to_image=res["text_to_image"],
                             n_images=res["n_images"], n_texts=res["n_texts"],
                             missing={k: res["missing"][k] for k in ("images_without_text", "texts_without_image")})
                if spec.cra:
                    entry["cra"] = _cra(Path(text["dir"]), spec.cra_fields, backend)
                    report.console.print(report.cra_table(entry["cra"]))
            result["sets"][spec.name] = entry
    finally:
        _Ray.stop()
    result["columns"] = report.suite_columns(cfg.sets)
    if other is not None:
        result["compare"] = {"other": str(compare), "model": other.get("model"),
                             "model_name": other.get("model_name"), "diff": suite_diff(result, other)}  # fmt: skip
    atomic.write_json(out / SUITE_JSON, report.rounded(result))
    atomic.write_text(out / SUITE_MD, report.suite_markdown(result, other))
    png = report.plot_suite(result, other, out / SUITE_PNG)
    report.console.print(report.suite_table(result, other))
    for name, why in result["skipped"].items():
        report.console.print(f"[yellow]skipped {name}: {why}")
    report.console.print(f"wrote {out / SUITE_JSON}, {out / SUITE_MD} and {png}")
    return result


def _load_other(compare: str | Path) -> dict:
    p = Path(compare)
    path = p / SUITE_JSON if p.is_dir() else p
    if not path.is_file():
        raise EvalError(f"--compare {compare}: no {SUITE_JSON} there (the OUT of another eval-suite run)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"--compare {path} is not a suite.json: {e}") from None


def suite_diff(result: dict, other: dict) -> dict:
    """This run minus the other, per set present in both, per headline metric (percentage points)."""
    diff = {}
    for name, entry in result["sets"].items():
        if name not in other.get("sets", {}):
            continue
        mine, theirs = report.metric_values(entry), report.metric_values(other["sets"][name])
        diff[name] = {k: (v - theirs[k] if v is not None and theirs.get(k) is not None else None)
                      for k, v in mine.items() if k in theirs}  # fmt: skip
    return diff


# --------------------------------------------------------------------------------------------- CLI


def register(app) -> None:
    @app.command("eval-suite")
    def eval_suite_cmd(
        model: Path = typer.Option(..., "--model", help="Trained model: RUN_DIR or RUN_DIR/export."),
        data: Path = typer.Option(..., "--data", help="Folder with one folder per evaluation set (see the suite)."),
        out: Path = typer.Option(..., "--out", help="Results, converted shards and caption caches (reused)."),
        suite: str = typer.Option(DEFAULT_SUITE, "--config", "--suite", help="Suite config: a YAML path or a name under configs/ (load_config)."),
        compare: Path | None = typer.Option(
            None, "--compare", help="OUT of another eval-suite run: both side by side, with the differences."
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        backend: str = typer.Option("auto", "--backend", help="Search backend: auto, faiss, faiss-gpu, numpy."),
    ) -> None:
        """Every evaluation set of the suite: retrieval both ways, CRA, zero-shot; suite.json, suite.md, suite.png."""
        from l2c import outputs

        outputs.check(out, "eval-suite", owns=OUT_NAMES)  # before any work: its own earlier output, or new
        run_suite(model, data, out, suite, compare, batch_size, device, backend)
        outputs.mark(out, "eval-suite")
