"""Eval commands: eval-retrieval, eval-cra, eval-zeroshot. Heavy imports stay inside the command bodies."""

from __future__ import annotations

from pathlib import Path

import typer

BACKEND_HELP = (
    "Search backend: auto (faiss-gpu when a GPU is there, else faiss CPU), faiss, faiss-gpu, numpy."
)


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values, in order: `--fields a,b --fields c` → [a, b, c]."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# What each eval command writes in its --out (a folder holding only these is its own earlier output).
OUT_NAMES = {"eval-retrieval": ("eval.json", "recall_curves.png"), "eval-cra": ("eval.json", "cache"),
             "eval-zeroshot": ("eval.json", "confusion_matrix.png")}  # fmt: skip


def _check_out(out: Path | None, command: str) -> None:
    """Before any work: --out is new, empty or this command's earlier output (`l2c.outputs`)."""
    if out is not None:
        from l2c import outputs

        outputs.check(out, command, owns=OUT_NAMES[command])


def _mark_out(out: Path | None, command: str) -> None:
    if out is not None:
        from l2c import outputs

        outputs.mark(out, command)


def register(app) -> None:
    @app.command("eval-retrieval")
    def eval_retrieval_cmd(
        model: Path = typer.Option(..., "--model", help="Trained model: RUN_DIR or RUN_DIR/export, or a released LLM2CLIP model directory."),
        images: list[str] = typer.Option(
            ..., "--images", help="Image shards: tar files, directories, globs or brace ranges (repeatable)."
        ),
        text_cache: str = typer.Option(..., "--text-cache", help="Text cache of the same images' captions (path or URL)."),
        k: str = typer.Option("1,5,10", "--k", help="Recall cut-offs, comma-separated."),
        fields: list[str] = typer.Option(
            None,
            "--text-field",
            "--fields",
            help="Caption fields to use (the embed command's --text-field spellings; comma-separated or "
            "repeated); default all of the cache's.",
        ),
        out: Path | None = typer.Option(None, "--out", help="Write OUT/eval.json and OUT/recall_curves.png."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
        allow_missing: bool = typer.Option(
            False,
            "--allow-missing",
            help="Evaluate matched pairs when some images have no caption or some captions no image "
            "(they are counted and listed in eval.json) instead of stopping.",
        ),
        ray_address: str | None = typer.Option(
            None, "--ray-address", envvar="RAY_ADDRESS",
            help="Compute image features with Ray tasks on this cluster (default: in this process).",
        ),
        use_gpu: bool = typer.Option(False, "--gpu", help="With --ray-address: one GPU per feature task."),
    ) -> None:
        """Image→text and text→image recall@K (CLIP_benchmark protocol) of a trained model."""
        from l2c.eval.recall import parse_ks
        from l2c.eval.retrieval import run_retrieval

        try:
            ks = parse_ks(k)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--k") from e
        _check_out(out, "eval-retrieval")
        run_retrieval(model, images, text_cache, ks, _split(fields), out, batch_size, device, backend,
                      allow_missing, ray_address, use_gpu)  # fmt: skip
        _mark_out(out, "eval-retrieval")

    @app.command("eval-cra")
    def eval_cra_cmd(
        text_cache: str | None = typer.Option(None, "--text-cache", help="Evaluate this text cache (path or URL)."),
        captions: Path | None = typer.Option(
            None, "--captions", help="Or: a captions file (.jsonl/.parquet/.tar) to embed with --model first."
        ),
        model: str | None = typer.Option(None, "--model", help="Text encoder for --captions (e.g. minilm)."),
        query_field: str | None = typer.Option(
            None, "--query-field", help="Query captions' field (default: the cache's first; captions[0])."
        ),
        gallery_field: str | None = typer.Option(
            None,
            "--gallery-field",
            help="Gallery captions' field (default: the cache's second; captions[1]).",
        ),
        key_field: str = typer.Option("image_id", "--key-field", help="Image key in --captions."),
        pooling: str | None = typer.Option(
            None, "--pooling", help="Pooling for --model (default: the model's)."
        ),
        instruction: str | None = typer.Option(None, "--instruction", help="Instruction prefix for --model."),
        max_length: int = typer.Option(512, "--max-length", help="Token limit for --model."),
        prompt_format: str | None = typer.Option(
            None, "--prompt-format",
            help="For --model: none, llm2vec-llama3, llm2vec-mistral, llm2vec-qwen2, llm2vec-gemma2 "
            "(default: the model's; llm2vec-llama3 for a released LLM2CLIP teacher).",
        ),  # fmt: skip
        out: Path | None = typer.Option(
            None, "--out", help="Write OUT/eval.json (and with --captions the cache under OUT/cache)."
        ),
        backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    ) -> None:
        """Caption retrieval accuracy (LLM2CLIP): first caption as query, every image's second as gallery."""
        from l2c.eval.cra import run_cra

        if (text_cache is None) == (captions is None):
            raise typer.BadParameter("give either --text-cache DIR or --captions FILE --model MODEL")
        if captions is not None and not model:
            raise typer.BadParameter("--captions needs --model (the text encoder to embed them with)")
        embed = {
            "pooling": pooling,
            "instruction": instruction,
            "max_length": max_length,
            "prompt_format": prompt_format,
        }
        _check_out(out, "eval-cra")
        run_cra(text_cache, captions, model, query_field, gallery_field, key_field, embed, out, backend)
        _mark_out(out, "eval-cra")

    @app.command("eval-zeroshot")
    def eval_zeroshot_cmd(
        model: Path = typer.Option(..., "--model", help="Trained model: RUN_DIR or RUN_DIR/export, or a released LLM2CLIP model directory."),
        images: list[str] = typer.Option(..., "--images", help="Labelled image shards (repeatable)."),
        classes: Path = typer.Option(..., "--classes", help="Class names, one per line."),
        templates: Path | None = typer.Option(
            None,
            "--templates",
            help="Prompt templates with {} for the class name, one per line "
            "(default: 'a photo of a {}.'; configs/zeroshot_templates.txt holds an ensemble).",
        ),  # fmt: skip
        label_field: str = typer.Option(
            "json:label", "--label-field", help="Where a sample's label is: json:KEY, or a member (cls, txt)."
        ),
        text_model: str | None = typer.Option(
            None, "--text-model", help="Text encoder directory, when the one recorded in the model has moved."
        ),
        prompt_format: str | None = typer.Option(
            None, "--prompt-format",
            help="How class prompts are wrapped for the text encoder (default: the format the model's text "
            "cache was made with, as recorded; none, llm2vec-llama3, llm2vec-mistral, llm2vec-qwen2, llm2vec-gemma2).",
        ),  # fmt: skip
        out: Path | None = typer.Option(
            None, "--out", help="Write OUT/eval.json and OUT/confusion_matrix.png."
        ),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        top_confused: int = typer.Option(10, "--top-confused", help="Most confused class pairs to list."),
    ) -> None:
        """Zero-shot classification: class names through prompt templates, the text encoder and the adapter."""
        from l2c.eval.zeroshot import run_zeroshot

        _check_out(out, "eval-zeroshot")
        run_zeroshot(model, images, classes, templates, label_field, text_model, out, batch_size, device,
                     top_confused, prompt_format)  # fmt: skip
        _mark_out(out, "eval-zeroshot")
