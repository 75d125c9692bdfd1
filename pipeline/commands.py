"""CLI commands of the pipeline: `embed-captions`, `embed-images`, `cache-info` and `align-cache`."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")  # `key=value` among the sources is a config override
RUNNER_HELP = ("auto|local|ray: local runs the stages in this process (auto does when the job is one encoder on "
               "this machine's CPUs and no Ray is addressed or running), ray as a Ray Data job")  # fmt: skip


def embed_captions(
    ctx: typer.Context,
    sources: Annotated[list[str] | None, typer.Argument(help="webdataset .tar shards, .jsonl or .parquet tables; globs and {000..009} ranges; key=value tokens are config overrides")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="cache directory: a path, a file:// URL, or an object-store URL (s3://, gs://); on a cluster, storage every node reaches")] = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML of EmbedConfig fields (configs/NAME.yaml or a path); flags given on the command line win, key=value overrides apply on top of the file")] = None,
    model: Annotated[str, typer.Option(help="local model dir, hub id, or `minilm` (the packaged all-MiniLM-L6-v2)")] = "minilm",
    text_field: Annotated[list[str], typer.Option("--text-field", "-f", help="repeatable: txt, json:long_caption, captions[0], captions[*]")] = ["txt"],  # noqa: B006
    key_field: Annotated[str, typer.Option(help="key column of table sources (tars use __key__)")] = "key",
    engine: Annotated[str, typer.Option(help="hf (transformers) or vllm (vLLM pooling runner; see pipeline/vllm_engine.py)")] = "hf",
    pooling: Annotated[str | None, typer.Option(help="mean|cls|last (default: the model's recorded setting, else mean)")] = None,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize")] = True,
    max_length: Annotated[int, typer.Option(help="tokens per caption, special tokens and instruction included")] = 512,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16 (auto: bf16 on GPU, fp32 on CPU)")] = "auto",
    store_dtype: Annotated[str, typer.Option(help="float16|float32 for the stored vectors")] = "float16",
    instruction: Annotated[str | None, typer.Option(help="prefix fed to the model but left out of pooling")] = None,
    lora: Annotated[str | None, typer.Option(help="peft LoRA adapter dir, merged at load")] = None,
    bidirectional: Annotated[bool | None, typer.Option("--bidirectional/--causal", help="decoders: attention mode (default bidirectional)")] = None,
    prompt_format: Annotated[str | None, typer.Option(help="none | llm2vec-llama3 | llm2vec-mistral | llm2vec-qwen2 | llm2vec-gemma2: wrap each caption as llm2vec does (default: the model's; llm2vec-llama3 for a released LLM2CLIP teacher)")] = None,
    batch_tokens: Annotated[int, typer.Option(help="padded tokens per batch")] = 16384,
    max_batch_size: Annotated[int | None, typer.Option(help="captions per batch at most (default 512 on GPU, 64 on CPU)")] = None,
    num_actors: Annotated[int | None, typer.Option(help="encoder actors (default: one per GPU, else 1)")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(help="CPUs reserved per encoder actor")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per encoder actor (0 forces CPU)")] = None,
    actor_resources: Annotated[str | None, typer.Option(help='custom Ray resources per encoder actor, JSON: \'{"encode": 1}\'')] = None,
    read_actors: Annotated[int | None, typer.Option(help="read/tokenize actors (default 4 on GPU; on CPU with one encoder actor, none: it reads and writes its shards itself)")] = None,
    ray_address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="join a Ray cluster (default: local Ray)")] = None,
    runner: Annotated[str, typer.Option(help=RUNNER_HELP)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="discard a cache made with other settings")] = False,
    strict: Annotated[bool, typer.Option(help="any rejected caption is an error")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> dict:  # fmt: skip
    """Embed every (key, field) caption of SOURCES into a Parquet text cache at OUT (resumable)."""
    from l2c.config import ConfigError, given, load_config
    from l2c.pipeline.embed_job import EmbedConfig, run_embed

    try:
        resources = json.loads(actor_resources) if actor_resources else None
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint="--actor-resources") from None
    if resources is not None and not isinstance(resources, dict):
        raise typer.BadParameter("expected a JSON object", param_hint="--actor-resources")
    overrides = [t for t in sources or [] if OVERRIDE.match(t)]
    srcs = [t for t in sources or [] if not OVERRIDE.match(t)]
    flags = given(ctx, {
        "out": ("out", out), "model": ("model", model), "text_fields": ("text_field", text_field),
        "key_field": ("key_field", key_field), "engine": ("engine", engine), "pooling": ("pooling", pooling),
        "normalize": ("normalize", normalize), "max_length": ("max_length", max_length), "dtype": ("dtype", dtype),
        "store_dtype": ("store_dtype", store_dtype), "instruction": ("instruction", instruction), "lora": ("lora", lora),
        "bidirectional": ("bidirectional", bidirectional), "prompt_format": ("prompt_format", prompt_format),
        "batch_tokens": ("batch_tokens", batch_tokens), "max_batch_size": ("max_batch_size", max_batch_size),
        "num_actors": ("num_actors", num_actors), "cpus_per_actor": ("cpus_per_actor", cpus_per_actor),
        "gpus_per_actor": ("gpus_per_actor", gpus_per_actor), "actor_resources": ("actor_resources", resources),
        "read_actors": ("read_actors", read_actors), "ray_address": ("ray_address", ray_address),
        "runner": ("runner", runner), "overwrite": ("overwrite", overwrite), "strict": ("strict", strict),
        "progress": ("progress", progress),
    })  # fmt: skip
    if srcs:
        flags["sources"] = srcs
    cfg = load_config(EmbedConfig, config, overrides, flags)
    if not cfg.sources:
        raise ConfigError("embed-captions needs SOURCES (or `sources:` in the --config file)")
    summary = run_embed(cfg)
    print_embed_summary(summary)
    return summary


def print_embed_summary(s: dict) -> None:
    t = Table(title=f"embed-captions → {s['out']}", show_header=False)
    t.add_row("shards (written / skipped / total)", f"{s['shards_written']} / {s['shards_skipped']} / {s['shards']}")
    if s["shards_failed"]:
        t.add_row("[red]shards unreadable", ", ".join(s["shards_failed"]))
    if s.get("shards_partial"):
        t.add_row("[yellow]shards partial (damaged source)", ", ".join(s["shards_partial"]))
    t.add_row("vectors in cache", f"{s['rows']:,} × {s['dim']}")
    if s.get("prompt_format"):
        t.add_row("prompt format", f"{s['prompt_format']}  ({s.get('prompt_format_source') or 'default'})")
    t.add_row("written this run", f"{s['rows_written']:,} captions, {s['tokens_written']:,} tokens")
    t.add_row("throughput", f"{s['captions_per_s']:,.1f} captions/s, {s['tokens_per_s']:,.0f} tokens/s")
    t.add_row("padding fraction", f"{s['padding_fraction']:.1%}")
    t.add_row("truncated", f"{s['truncated']:,}")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected_by_reason_this_run"].items())) or "none"
    t.add_row("rejected (see rejected.jsonl)", f"{s['rejected']:,}  ({reasons})")
    t.add_row("time", f"{s['seconds']:.1f} s  ({_runner_text(s)})")
    console.print(t)


def _runner_text(s: dict) -> str:
    return "in this process" if s.get("runner") == "local" else "Ray Data job"


def cache_info(
    cache: Annotated[str, typer.Argument(help="cache directory or URL (s3://, gs://)")],
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="check every shard's rows, dim and sha256")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest summary as JSON")] = False,
) -> dict:  # fmt: skip
    """Print a cache's manifest summary (a text or an image cache) and validate every shard."""
    from l2c.image_cache import ImageCache, open_cache

    c = open_cache(cache)
    image = isinstance(c, ImageCache)
    problems = c.validate() if validate else []
    info = {
        "dir": str(cache),
        "settings": c.settings,
        "shards": len(c.shard_names),
        "rows": len(c),
        "rejected": sum(s.n_rejected for s in c.manifest.shards.values()),
        "truncated": sum(s.n_truncated for s in c.manifest.shards.values()),
        "l2c_version": c.manifest.l2c_version,
        "valid": not problems,
        "problems": problems,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        t = Table(title=f"{'image' if image else 'text'} cache {cache}", show_header=False)
        keys = ("model", "model_fingerprint", "model_type", "image_spec", "dtype", "store_dtype", "dim",
                "patch_mean") if image else ("model", "model_fingerprint", "engine", "pooling", "normalize",
                "max_length", "dtype", "store_dtype", "dim", "instruction", "prompt_format", "fields")  # fmt: skip
        for k in keys:
            v = c.settings.get(k, "none" if k == "prompt_format" else None)
            if k == "prompt_format" and c.settings.get("prompt_format_source"):
                v = f"{v}  ({c.settings['prompt_format_source']})"
            t.add_row(k, (str(v)[:16] + "…") if k == "model_fingerprint" else str(v))
        t.add_row("shards / rows", f"{info['shards']} / {info['rows']:,}")
        t.add_row("rejected / truncated", f"{info['rejected']:,} / {info['truncated']:,}")
        status = "[green]all shards valid" if not problems else "[red]" + "; ".join(problems[:5])
        t.add_row("validation", status if validate else "skipped")
        console.print(t)
    if problems:
        raise typer.Exit(1)
    return info


def embed_images(
    ctx: typer.Context,
    sources: Annotated[list[str] | None, typer.Argument(help="webdataset .tar shards: paths, directories, globs, {000..009} ranges, URLs; key=value tokens are config overrides")] = None,
    model: Annotated[str | None, typer.Option("--model", help="the vision tower: a transformers model directory (pretrained, or random weights saved with save_pretrained); train-vision uses it as model.vision.pretrained")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="image cache directory: a path or an object-store URL (s3://, gs://)")] = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML of ImageEmbedConfig fields (configs/NAME.yaml or a path); key=value overrides apply on top, flags given on the command line win")] = None,
    patch_mean: Annotated[bool, typer.Option("--patch-mean/--no-patch-mean", help="also store the mean of the last layer's patch tokens")] = False,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16 for the tower (auto: bf16 on GPU, fp32 on CPU)")] = "auto",
    store_dtype: Annotated[str, typer.Option(help="float32|float16 for the stored features")] = "float32",
    batch_size: Annotated[int, typer.Option(help="images per tower forward")] = 64,
    decode_threads: Annotated[int | None, typer.Option(help="image decoding threads per encoder actor (default 8 on GPU, 2 on CPU)")] = None,
    num_actors: Annotated[int | None, typer.Option(help="encoder actors (default: one per GPU, else 1)")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(help="CPUs reserved per encoder actor")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per encoder actor (0 forces CPU)")] = None,
    ray_address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="join a Ray cluster (default: local Ray)")] = None,
    runner: Annotated[str, typer.Option(help=RUNNER_HELP)] = "auto",
    overwrite: Annotated[bool, typer.Option(help="discard a cache made with other settings")] = False,
    strict: Annotated[bool, typer.Option(help="any rejected image is an error")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> dict:  # fmt: skip
    """Cache a frozen vision tower's features for every image of SOURCES at OUT (resumable; see docs/reference.md)."""
    from l2c.config import ConfigError, given, load_config
    from l2c.pipeline.embed_images import ImageEmbedConfig, run_embed_images

    flags = given(ctx, {k: (k, v) for k, v in {
        "out": out, "model": model, "patch_mean": patch_mean, "dtype": dtype, "store_dtype": store_dtype,
        "batch_size": batch_size, "decode_threads": decode_threads, "num_actors": num_actors,
        "cpus_per_actor": cpus_per_actor, "gpus_per_actor": gpus_per_actor, "ray_address": ray_address,
        "runner": runner, "overwrite": overwrite, "strict": strict, "progress": progress}.items()})  # fmt: skip
    if srcs := [t for t in sources or [] if not OVERRIDE.match(t)]:
        flags["sources"] = srcs
    cfg = load_config(ImageEmbedConfig, config, [t for t in sources or [] if OVERRIDE.match(t)], flags)
    for what, value in (("SOURCES", cfg.sources), ("--model", cfg.model), ("--out", cfg.out)):
        if not value:
            raise ConfigError(f"embed-images needs {what} (or its key in the --config file)")
    s = run_embed_images(cfg)
    t = _shard_table(f"embed-images → {s['out']}", s, s["shards"], "shards unreadable", "damaged source")
    t.add_row("features in cache", f"{s['rows']:,} × {s['dim']}" + ("  (+ patch-token mean)" if s["patch_mean"] else ""))
    t.add_row("throughput", f"{s['images_per_s']:,.1f} images/s")
    t.add_row("rejected (see rejected.jsonl)", f"{s['rejected']:,}  ({_reasons(s)})")
    t.add_row("time", f"{s['seconds']:.1f} s  ({_runner_text(s)})")
    console.print(t)
    return s


def _shard_table(title: str, s: dict, total: int, failed: str, partial: str) -> Table:
    """The summary's first rows, shared by the commands that write one shard per source."""
    t = Table(title=title, show_header=False)
    t.add_row("shards (written / skipped / total)", f"{s['shards_written']} / {s['shards_skipped']} / {total}")
    if s["shards_failed"]:
        t.add_row(f"[red]{failed}", ", ".join(s["shards_failed"]))
    if s["shards_partial"]:
        t.add_row(f"[yellow]shards partial ({partial})", ", ".join(s["shards_partial"]))
    return t


def _reasons(s: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected_by_reason_this_run"].items())) or "none"


def align_cache(
    ctx: typer.Context,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of AlignConfig fields (after --config)")] = None,
    text_cache: Annotated[str | None, typer.Option("--text-cache", help="the text cache to align: rows grouped otherwise than the tars (e.g. embedded from caption tables)")] = None,
    images: Annotated[list[str] | None, typer.Option("--images", help="image tars: paths, directories, globs, brace ranges, URLs (repeatable)")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="the aligned cache: one shard per tar (a path or an object-store URL); a rerun writes only the shards it lacks")] = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML of AlignConfig fields (configs/NAME.yaml or a path); key=value overrides apply on top, flags given on the command line win")] = None,
    partition_mb: Annotated[float, typer.Option(help="vectors per partition, MB: what one task holds (about twice this at its peak)")] = 1024,
    ray_address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="join a Ray cluster (default: this process, or a running local Ray)")] = None,
    runner: Annotated[str, typer.Option(help="auto|local|ray: local runs the stages in this process (auto does when no Ray is addressed or running), ray as a Ray Data job")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> dict:  # fmt: skip
    """Rewrite a text cache as one shard per image tar, rows in the tar's key order (an aligned cache)."""
    from l2c.config import given, load_config
    from l2c.pipeline.align import AlignConfig, run_align

    flags = given(ctx, {k: (k, v) for k, v in {
        "text_cache": text_cache, "images": images, "out": out, "partition_mb": partition_mb,
        "ray_address": ray_address, "runner": runner, "progress": progress}.items()})  # fmt: skip
    s = run_align(load_config(AlignConfig, config, overrides, flags))
    t = _shard_table(f"align-cache → {s['out']}", s, s["tars"], "tars unreadable", "damaged tar")
    t.add_row("vectors in cache", f"{s['rows']:,} × {s['dim']}")
    t.add_row("tar keys without a vector (rejected.jsonl)", f"{s['rejected']:,}  ({_reasons(s)})")
    t.add_row("text cache rows of no tar aligned now", f"{s['cache_rows_not_routed']:,} of {s['cache_rows_read']:,}")
    t.add_row("partitions / peak RSS per task", f"{s['partitions']} / {max(s['peak_rss_mb'].values()):,.0f} MB")
    t.add_row("time", f"{s['seconds']:.1f} s  ({_runner_text(s)})")
    console.print(t)
    return s


def mine_negatives(
    ctx: typer.Context,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of MineConfig fields (after --config; e.g. nlist=4096 pca_dim=128 pq=16)")] = None,
    text_cache: Annotated[str | None, typer.Option("--text-cache", help="the text cache whose keys to mine (a path or an object-store URL; with a URL, give --out)")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="a local folder for the neighbours, one Parquet per cache shard (default TEXT_CACHE/negatives, where train-vision looks)")] = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML of MineConfig fields (configs/NAME.yaml or a path); key=value overrides apply on top, flags given on the command line win")] = None,
    k: Annotated[int, typer.Option(help="neighbours kept per key, nearest first")] = 16,
    field: Annotated[list[str], typer.Option("--field", "-f", help="repeatable: the caption fields a key's vector averages (default all)")] = [],  # noqa: B006
    index: Annotated[str, typer.Option(help="auto | flat (exact) | ivfpq (PCA, IVF-HNSW, PQ: bounded memory at any size) | a faiss index_factory string")] = "auto",
    nprobe: Annotated[int, typer.Option(help="inverted lists searched per query (ivfpq and IVF factory strings)")] = 16,
    train_size: Annotated[int, typer.Option(help="key vectors sampled to train the index")] = 262_144,
    seed: Annotated[int, typer.Option(help="seed of the training sample")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> dict:  # fmt: skip
    """Mine each key's nearest other keys in a text cache (faiss), one Parquet per cache shard (resumable)."""
    from l2c.config import given, load_config
    from l2c.pipeline.negatives import MineConfig, run_mine

    flags = given(ctx, {key: (name, v) for key, (name, v) in {
        "text_cache": ("text_cache", text_cache), "out": ("out", out), "k": ("k", k), "fields": ("field", field),
        "index": ("index", index), "nprobe": ("nprobe", nprobe), "train_size": ("train_size", train_size),
        "seed": ("seed", seed), "progress": ("progress", progress)}.items()})  # fmt: skip
    cfg = load_config(MineConfig, config, overrides, flags)
    s = run_mine(cfg)
    t = Table(title=f"mine-negatives → {s['out']}", show_header=False)
    t.add_row("keys / shards (written now)", f"{s['keys']:,} / {s['shards']} ({s['shards_written']})")
    t.add_row("index / neighbours per key", f"{s['index']} / {cfg.k}")
    t.add_row("time", f"{s['seconds']:.1f} s")
    console.print(t)
    return s


def register(app: typer.Typer) -> None:
    app.command("embed-captions")(embed_captions)
    app.command("embed-images")(embed_images)
    app.command("cache-info")(cache_info)
    app.command("align-cache")(align_cache)
    app.command("mine-negatives")(mine_negatives)
