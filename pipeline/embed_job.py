"""`l2c embed-captions`: a resumable Ray Data job that writes the text-embedding cache.

Stages, one Ray Data row per source shard so every stage sees a whole shard:
  read + validate + tokenize (CPU actors) → encode (model actors, one per GPU or CPU slot) → write Parquet
  (tasks; temp name + rename, or one upload to an object store) → the driver records each
  finished shard in the manifest journal. With one encoder actor on CPUs that actor does all three itself.
A rerun with the same settings skips finished shards; a crash loses only the shards in flight.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from l2c.cache import (
    FORMAT_NAME,
    JOURNAL_DIR,
    MANIFEST,
    REJECTED,
    REJECTED_DIR,
    CacheError,
    Manifest,
    ShardEntry,
    open_cache_store,
)
from l2c.config import ConfigError
from l2c.errors import L2CError
from l2c.lock import OutputLock
from l2c.pipeline import crosscheck
from l2c.pipeline.runner import Runner, Stage, check_runner, encoder_layout
from l2c.ray_utils import valid_resources
from l2c.storage import Store


@dataclass
class EmbedConfig:
    """Everything `embed-captions` needs; the CLI flags map one to one onto these fields."""

    sources: list[str] = field(default_factory=list)
    out: str = ""
    model: str = "minilm"
    text_fields: list[str] = field(default_factory=lambda: ["txt"])
    key_field: str = "key"
    engine: str = "hf"
    pooling: str | None = None
    normalize: bool = True
    max_length: int = 512
    dtype: str = "auto"
    store_dtype: str = "float16"
    instruction: str | None = None
    lora: str | None = None
    bidirectional: bool | None = None
    prompt_format: str | None = None  # none | llm2vec-llama3 | ... (default: the model's, see encoder.default_prompt_format)
    batch_tokens: int = 16384
    max_batch_size: int | None = None  # default: 512 on GPU, 64 on CPU (where padding is pure cost)
    num_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    actor_resources: dict[str, float] | None = None  # custom Ray resources per encoder actor, e.g. {"encode": 1}
    read_actors: int | None = None  # read/tokenize actors (default: 4 on GPU; none on CPU with one encoder)
    ray_address: str | None = None
    runner: str = "auto"  # auto | local | ray (see pipeline/runner.py)
    overwrite: bool = False
    strict: bool = False
    progress: bool = True

    def validate(self) -> None:
        from l2c.cache import STORE_DTYPES
        from l2c.pipeline.encoder import DTYPES, POOLINGS
        from l2c.pipeline.prompt_formats import get_format

        get_format(self.prompt_format)  # an unknown name is an L2CError naming the known ones
        if self.engine not in ("hf", "vllm"):
            raise ConfigError(f"--engine must be hf or vllm, got {self.engine!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {POOLINGS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {DTYPES}")
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"--store-dtype must be one of {sorted(STORE_DTYPES)}")
        if not self.text_fields:
            raise ConfigError("at least one --text-field is needed")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be positive")
        if self.max_length < 4 or self.batch_tokens < self.max_length:
            raise ConfigError("need max_length >= 4 and batch_tokens >= max_length")
        if self.num_actors is not None and self.num_actors < 1 or self.read_actors is not None and self.read_actors < 1:
            raise ConfigError("--num-actors and --read-actors must be positive")
        if not valid_resources(self.actor_resources):
            raise ConfigError(f"--actor-resources must map resource names to numbers >= 0, got {self.actor_resources}")
        check_runner(self.runner, self.ray_address, num_actors=(self.num_actors or 1) > 1,
                     read_actors=self.read_actors is not None, actor_resources=bool(self.actor_resources))  # fmt: skip


# Between the stages a shard travels as one row of an Arrow table with typed columns (token ids and vectors as
# flat list columns with their lengths), so Ray Data moves Arrow buffers, not pickled Python objects.
def _lists(values: np.ndarray, arrow_type) -> pa.ListArray:
    """One list row holding `values` (a numpy array), without going through Python lists."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), pa.array(values, arrow_type))


def _row(table, name: str, i: int = 0) -> np.ndarray:
    """Row `i` of a list column as numpy."""
    return table.column(name)[i].values.to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- stage 1: read, validate, tokenize
class ReadTokenize:
    """Ray Data actor: one source shard in, its accepted captions as token ids (plus rejects) out."""

    def __init__(self, spec: dict, tokenizer=None):
        """`tokenizer`: one already loaded from `spec["model_path"]` (the encoder's, when one actor does both)."""
        from transformers import AutoTokenizer

        from l2c.pipeline.encoder import CaptionTokenizer

        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(spec["model_path"])
        self.captions = CaptionTokenizer(tok, spec["max_length"], spec["instruction"], spec["prompt_format"])
        self.args = (spec["fields"], spec["key_field"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from l2c.pipeline.sources import read_shard

        parts = []
        for shard, source in zip(batch["shard"].to_pylist(), batch["source"].to_pylist(), strict=True):
            rows = read_shard(str(source), str(shard), *self.args)
            tok = self.captions(rows.texts)
            lengths = np.fromiter(map(len, tok.ids), np.int32, len(tok.ids))
            flat = np.fromiter((t for x in tok.ids for t in x), np.int32, int(lengths.sum()))
            parts.append(pa.table({
                "shard": [str(shard)], "source": [str(source)],
                "keys": pa.array([rows.keys], pa.list_(pa.string())),
                "fields": pa.array([rows.fields], pa.list_(pa.string())),
                "ids": _lists(flat, pa.int32()), "lengths": _lists(lengths, pa.int32()),
                "pool_start": _lists(np.asarray(tok.pool_start, np.int32), pa.int32()),
                "n_tokens": _lists(np.asarray(tok.n_tokens, np.int32), pa.int32()),
                "truncated": _lists(np.asarray(tok.truncated, bool), pa.bool_()),
                "rejects": [json.dumps(rows.rejects)], "n_samples": pa.array([rows.n_samples], pa.int64()),
                "failed": [any(r["reason"] == "unreadable_shard" for r in rows.rejects)], "partial": [rows.partial],
            }))  # fmt: skip
        return pa.concat_tables(parts)


# ---------------------------------------------------------------- stage 2: encode
class EncodeShard:
    """Ray Data actor holding the frozen text model; encodes a whole shard with token-budget batches.

    With `write` (the keyword arguments of `write_shard`) the actor also reads, tokenizes and writes its shards
    itself: the one-encoder CPU layout, where a separate reader and writer would only be more processes
    competing for the same cores."""

    def __init__(self, spec: dict, threads: int | None, write: dict | None = None):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        # On a CPU the hf engine runs `threads` batches at once with one torch thread each (see
        # TextEncoder.encode_tokenized); other engines get the threads as intra-op threads.
        self.streams = int(threads) if threads and spec.get("engine", "hf") == "hf" else 1
        self._threads_before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(1 if self.streams > 1 else int(threads))
        self.spec = spec
        from l2c.teacher import TeacherSpec, build_text_encoder

        batch = {"batch_tokens": spec["batch_tokens"], "max_batch_size": spec["max_batch_size"]}
        self.encoder = build_text_encoder(TeacherSpec.from_dict(spec), batch=batch)
        self.read = ReadTokenize(spec, getattr(self.encoder, "tokenizer", None)) if write is not None else None
        self.write = write

    def __call__(self, batch: pa.Table) -> pa.Table:
        from l2c.pipeline.encoder import Tokenized

        if self.read is not None:
            batch = self.read(batch)
        store = np.float16 if self.spec["store_dtype"] == "float16" else np.float32
        extra = {"streams": self.streams} if self.streams > 1 else {}
        vectors, stats_col, secs = [], [], []
        for i in range(batch.num_rows):
            offsets = np.concatenate([[0], np.cumsum(_row(batch, "lengths", i))])
            flat = _row(batch, "ids", i)
            ids = [flat[offsets[j] : offsets[j + 1]] for j in range(len(offsets) - 1)]
            tok = Tokenized(ids, _row(batch, "pool_start", i), _row(batch, "n_tokens", i), _row(batch, "truncated", i))
            stats: dict = {}
            t0 = time.perf_counter()
            emb = self.encoder.encode_tokenized(tok, self.spec["batch_tokens"], self.spec["max_batch_size"], stats,
                                                **extra)  # fmt: skip
            vectors.append(_lists(emb.astype(store).reshape(-1), pa.from_numpy_dtype(store)))
            stats_col.append(json.dumps(stats))
            secs.append(time.perf_counter() - t0)
        out = batch.drop_columns(["ids", "lengths", "pool_start"])
        out = out.append_column("embeddings", pa.concat_arrays(vectors))
        out = out.append_column("stats", pa.array(stats_col, pa.string()))
        out = out.append_column("encode_s", pa.array(secs, pa.float64()))
        return out if self.write is None else pa.table(write_shard(out, **self.write))


    def close(self) -> None:
        """Let the engine go (vLLM's engine holds processes and memory until shut down) and give the process
        its torch threads back (in-process runs)."""
        import torch

        if hasattr(self.encoder, "shutdown"):
            self.encoder.shutdown()
        torch.set_num_threads(self._threads_before)


# ---------------------------------------------------------------- stage 3: write
def write_shard(batch: pa.Table, out_dir: str, store_dtype: str, dim: int, strict: bool) -> dict:
    """Ray Data task: Parquet (atomic) + the shard's rejects file; returns the manifest entry as JSON."""
    from l2c.cache import build_table, write_shard_file

    store = Store(out_dir)
    out = {"shard": [], "result": []}
    for i in range(batch.num_rows):
        shard = batch.column("shard")[i].as_py()
        rejects = json.loads(batch.column("rejects")[i].as_py())
        stats = json.loads(batch.column("stats")[i].as_py())
        store.makedirs(REJECTED_DIR)
        store.write_text(f"{REJECTED_DIR}/{shard}.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        result = {"status": "done", "rejects": _reason_counts(rejects), "stats": stats,
                  "n_samples": batch.column("n_samples")[i].as_py(), "encode_s": batch.column("encode_s")[i].as_py()}  # fmt: skip
        if batch.column("failed")[i].as_py():
            result["status"] = "failed"
            result["detail"] = rejects[0]["detail"]
        elif strict and rejects:
            result["status"] = "strict"
            result["detail"] = rejects[:5]
        else:
            keys, truncated = batch.column("keys")[i].as_py(), _row(batch, "truncated", i)
            emb = _row(batch, "embeddings", i).reshape(len(keys), dim)
            table = build_table(keys, batch.column("fields")[i].as_py(), emb, _row(batch, "n_tokens", i), truncated,
                                store_dtype)  # fmt: skip
            rows, digest = write_shard_file(store, f"{shard}.parquet", table)
            result["key_hashes"] = crosscheck.pack(crosscheck.key_hashes(keys))  # for the cross-source check
            entry = ShardEntry(
                file=f"{shard}.parquet", source=batch.column("source")[i].as_py(), rows=rows, sha256=digest,
                partial=bool(batch.column("partial")[i].as_py()),
                n_rejected=len(rejects), n_truncated=int(np.sum(truncated)),
                n_tokens=int(stats.get("real_tokens", 0)), padded_tokens=int(stats.get("padded_tokens", 0)),
            )  # fmt: skip
            result["entry"] = asdict(entry)
        out["shard"].append(shard)
        out["result"].append(json.dumps(result))
    return out


def _reason_counts(rejects: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


# ---------------------------------------------------------------- driver
def resolve_settings(cfg: EmbedConfig, gpus_available: bool) -> tuple[dict, dict]:
    """(settings recorded in the manifest: the teacher spec, the fields, the key field; the one resolved spec every
    actor works from, so no actor derives a setting again)."""
    from l2c.meta import WHITESPACE, TextCacheSettings
    from l2c.teacher import resolve_teacher

    teacher = resolve_teacher(
        cfg.model, lora=cfg.lora, engine=cfg.engine, pooling=cfg.pooling, normalize=cfg.normalize,
        max_length=cfg.max_length, dtype=cfg.dtype, store_dtype=cfg.store_dtype, instruction=cfg.instruction,
        bidirectional=cfg.bidirectional, prompt_format=cfg.prompt_format, device_type="cuda" if gpus_available else "cpu",
    )  # fmt: skip
    settings = TextCacheSettings(teacher, tuple(cfg.text_fields), cfg.key_field, WHITESPACE).to_dict()
    spec = {**settings, "batch_tokens": cfg.batch_tokens, "max_batch_size": cfg.max_batch_size}
    return settings, spec


def text_identity(settings: dict) -> dict:
    """What a rerun into a text cache must agree on (teacher identity, fields, key field, dim, whitespace)."""
    from l2c.meta import TextCacheSettings

    return TextCacheSettings.from_dict(settings).identity()


def open_manifest(out: Store, settings: dict, overwrite: bool, identity=text_identity, fmt: str = FORMAT_NAME) -> Manifest:
    """The existing manifest when settings agree; a fresh one (old outputs removed) with --overwrite.
    `identity` (settings -> the dict that must agree) and `fmt`: those of another cache kind (`embed-images`)."""
    if out.exists(MANIFEST):
        old = Manifest.load(out)
        was, now = identity(old.settings), identity(settings)
        diff = {k: (was.get(k), now.get(k)) for k in now if was.get(k) != now.get(k)}
        if old.format != fmt:
            diff["format"] = (old.format, fmt)
        if not diff:
            old.settings = settings
            return old
        if not overwrite:
            what = "; ".join(f"{k}: cache has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            raise CacheError(
                f"{out} already holds a cache made with other settings ({what}): "
                "use another --out, or --overwrite to discard it"
            )
        for name in [*out.list("", ".parquet"), MANIFEST, REJECTED]:
            out.remove(name)
        for name in out.list(REJECTED_DIR, ".jsonl"):
            out.remove(f"{REJECTED_DIR}/{name}")
    return Manifest(settings=settings, format=fmt)


def assemble_rejects(out: Store, shards: list[str]) -> int:
    """Write DIR/rejected.jsonl from the per-shard files of this job's shards; returns the count."""
    lines = []
    have = set(out.list(REJECTED_DIR, ".jsonl"))
    for name in shards:
        if f"{name}.jsonl" in have:
            lines += [ln for ln in out.read_text(f"{REJECTED_DIR}/{name}.jsonl").splitlines() if ln.strip()]
    out.write_text(REJECTED, "".join(ln + "\n" for ln in lines))
    return len(lines)


def open_output(url: str, command: str):
    """(store, lock): the cache directory made and locked for `command` (a second job into it is refused),
    the temp files a killed run left removed. It may be new, empty or a cache (`l2c.outputs`), never a file,
    a folder of other files, or inside a run or another cache."""
    from l2c.outputs import check_store

    out = open_cache_store(url)
    check_store(out, command, str(url))
    out.makedirs()
    lock = OutputLock.acquire(out, command)
    for sub in ("", REJECTED_DIR, JOURNAL_DIR):
        out.remove_stale_tmp(sub)
    return out, lock


def shards_to_do(manifest, out, sources: list[str], names: dict[str, str]) -> list[str]:
    """The sources without a complete shard: not in the manifest, partial (retried), or its file missing."""
    done = {e.source for e in manifest.shards.values() if not e.partial}
    have = set(out.list("", ".parquet"))
    return [s for s in sources if s not in done or f"{names[s]}.parquet" not in have]


def run_embed(cfg: EmbedConfig) -> dict:
    """Embed every (key, field) caption of the sources into the cache at `cfg.out`; returns a summary."""
    from l2c.pipeline.sources import expand_sources, shard_names

    cfg.validate()
    if not cfg.out:
        raise ConfigError("embed-captions needs --out (or `out:` in the --config file)")
    if cfg.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise L2CError("--engine vllm needs vLLM: pip install 'l2c[vllm]' (or `make install-vllm` on CPU)")
        if cfg.lora:
            raise L2CError("--engine vllm does not merge LoRA adapters: pass the merged model directory "
                             "(finetune-text writes OUT/model/) as --model, or use --engine hf")
    sources = expand_sources(cfg.sources)
    if not sources:
        raise L2CError(f"no sources: {' '.join(cfg.sources) or 'none given'} matched no file")
    names = shard_names(sources)
    out, lock = open_output(cfg.out, "embed-captions")

    runner, stopped = None, False
    t0 = time.time()
    try:
        runner = Runner.start(cfg.runner, cfg.ray_address,
                              lambda gpus, cpus: layout(cfg, gpus, cpus)["fused"] and not cfg.actor_resources)
        lay = layout(cfg, runner.gpus, runner.cpus, runner.local)
        settings, spec = resolve_settings(cfg, lay["on_gpu"])
        manifest = open_manifest(out, settings, cfg.overwrite)
        manifest.save(out)
        todo = shards_to_do(manifest, out, sources, names)
        skipped = len(sources) - len(todo)
        results = Tally()
        if todo:
            results = _run_pipeline(cfg, todo, names, spec, settings, runner, lay, manifest, out)
        # a key in two sources stays in the first (source order); its rows in later ones are rejected
        order = [names[s] for s in sources]
        dropped = crosscheck.drop_cross_duplicates(out, manifest, order, results.hashes, cfg.strict, bool(todo))
        if dropped:
            manifest.save(out)
            for k, v in dropped.items():
                results.reasons[k] = results.reasons.get(k, 0) + v
        n_rejects = assemble_rejects(out, order)
        empty = not results.failed and not any(manifest.shards[n].rows for n in order if n in manifest.shards)
        if empty:  # no vector at all: its manifest goes, so a rerun with the right field starts clean
            crosscheck.clear_empty(out, manifest, order)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: finished shards stay, what was in flight goes
        stopped = True
        raise
    finally:
        if runner is not None:
            runner.stop()
        if stopped:  # the actors are gone: their temp files can go
            for sub in ("", REJECTED_DIR, JOURNAL_DIR):
                out.remove_stale_tmp(sub)
        lock.release()
    if empty:
        raise L2CError(crosscheck.nothing_embedded(cfg.out, sources, cfg.text_fields, cfg.key_field, results.reasons))
    return {**_summary(cfg, sources, names, manifest, results, skipped, n_rejects, time.time() - t0),
            "runner": runner.name}  # fmt: skip


def layout(cfg: EmbedConfig, gpus: float, cpus: float, local: bool = False) -> dict:
    """How the job spreads over `gpus`/`cpus`: encoder actors, their CPUs/GPUs and torch threads, read actors,
    and whether one encoder reads, tokenizes and writes its shards itself (`fused`; always so in this process)."""
    lay = encoder_layout(gpus, cpus, local, cfg.num_actors, cfg.gpus_per_actor, cfg.cpus_per_actor, 1)
    return {**lay,
            "n_readers": cfg.read_actors or max(1, min(4 if lay["on_gpu"] else 1, int(cpus // 2) or 1)),
            # one encoder on CPUs: it reads, tokenizes and writes itself (fewer processes on the same cores)
            "fused": local or (not lay["on_gpu"] and lay["n_actors"] == 1 and cfg.read_actors is None)}  # fmt: skip


def _run_pipeline(cfg, todo, names, spec, settings, runner: Runner, lay: dict, manifest, out) -> Tally:
    from l2c.progress import ProgressBar

    spec = {**spec, "max_batch_size": cfg.max_batch_size or (512 if lay["on_gpu"] else 64)}
    write = {"out_dir": out.url, "store_dtype": settings["store_dtype"], "dim": settings["dim"], "strict": cfg.strict}
    encode = Stage(EncodeShard, (spec, lay["threads"], write if lay["fused"] else None), actors=lay["n_actors"],
                   num_cpus=min(lay["cpus_per"], max(runner.cpus - 1, 0.5)),
                   num_gpus=lay["gpus_per"] if lay["on_gpu"] else 0, resources=cfg.actor_resources)  # fmt: skip
    stages = [encode]
    if not lay["fused"]:
        readers = cfg.read_actors or min(len(todo), lay["n_readers"])  # by default no more readers than shards
        stages = [Stage(ReadTokenize, (spec,), actors=readers, num_cpus=0.5), encode,
                  Stage(write_shard, kwargs=write, num_cpus=0.25)]  # fmt: skip

    sizes = {names[s]: _size(s) for s in todo}
    results, strict_fail = Tally(), None
    with ProgressBar(as_bytes=True, rate=False, enabled=cfg.progress,
                     fields="{shards}/{n_shards} shards  {captions_per_s:,.0f} captions/s {tokens_per_s:,.0f} tok/s") as bar:
        bar.add("embed", total=sum(sizes.values()), shards=0, n_shards=len(todo), captions_per_s=0, tokens_per_s=0)
        for row in runner.run([{"shard": names[s], "source": s} for s in todo], stages):
            res = json.loads(row["result"])
            res["shard"] = row["shard"]
            results.add(res)
            if res["status"] == "done":
                manifest.record(out, row["shard"], ShardEntry(**res["entry"]))  # flat cost per shard
            elif res["status"] == "strict" and strict_fail is None:
                strict_fail = res
            e = res.get("entry", {})
            bar.advance(sizes[row["shard"]], tally={"shards": 1, "captions": e.get("rows", 0),
                                                    "tokens": e.get("n_tokens", 0)})
    manifest.save(out)  # the journal folded into manifest.json
    if strict_fail:
        rejects_file = out.display(f"{REJECTED_DIR}/{strict_fail['shard']}.jsonl")
        raise CacheError(
            f"--strict: shard {strict_fail['shard']} has rejected captions, e.g. {strict_fail['detail'][:2]}; "
            f"see {rejects_file}"
        )
    return results


def _size(path: str) -> int:
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path)
        return max(1, int(fs.size(p)))
    except Exception:
        return 1


class Tally:
    """What the summary needs from this run's finished shards, summed as they arrive; per shard the driver
    keeps only its keys' 8-byte hashes for the cross-source check (120 MB at 15M keys, see `crosscheck`)."""

    def __init__(self):
        self.written = self.rows = self.tokens = self.padded = 0
        self.reasons: dict[str, int] = {}
        self.failed: list[str] = []
        self.partial: list[str] = []
        self.hashes: dict = {}  # shard -> 8-byte hashes of its keys (`crosscheck`: keys across sources)

    def add(self, res: dict) -> None:
        if "key_hashes" in res:
            self.hashes[res["shard"]] = crosscheck.unpack(res.pop("key_hashes"))
        for k, v in res.get("rejects", {}).items():
            self.reasons[k] = self.reasons.get(k, 0) + v
        e = res.get("entry", {})
        self.written += res["status"] == "done"
        self.rows += e.get("rows", 0)
        self.tokens += e.get("n_tokens", 0)
        self.padded += e.get("padded_tokens", 0)
        if res["status"] == "failed":
            self.failed.append(res["shard"])
        if e.get("partial"):
            self.partial.append(res["shard"])


def _summary(cfg, sources, names, manifest, results: Tally, skipped, n_rejects, elapsed) -> dict:
    entries = [manifest.shards[names[s]] for s in sources if names[s] in manifest.shards]
    rows_new, toks_new, padded = results.rows, results.tokens, results.padded
    return {
        "out": str(cfg.out),
        "shards": len(sources),
        "shards_written": results.written,
        "shards_skipped": skipped,
        "shards_failed": results.failed,
        "shards_partial": results.partial,
        "rows": sum(e.rows for e in entries),
        "rows_written": rows_new,
        "rejected": n_rejects,
        "rejected_by_reason_this_run": results.reasons,
        "truncated": sum(e.n_truncated for e in entries),
        "tokens_written": toks_new,
        "padding_fraction": 0.0 if not padded else 1 - toks_new / padded,
        "seconds": elapsed,
        "captions_per_s": rows_new / elapsed if elapsed else 0.0,
        "tokens_per_s": toks_new / elapsed if elapsed else 0.0,
        "dim": manifest.settings["dim"],
        "model_fingerprint": manifest.settings["model_fingerprint"],
        "prompt_format": manifest.settings.get("prompt_format", "none"),
        "prompt_format_source": manifest.settings.get("prompt_format_source", ""),
        "released_class": manifest.settings.get("released_class"),
    }
