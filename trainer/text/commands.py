"""`l2c finetune-text`: caption-contrastive fine-tuning of a text encoder (LLM2CLIP stage 1)."""

from __future__ import annotations

from pathlib import Path

import typer


def step_reporter(bar):
    """An `on_step` callback drawing training records on a `ProgressBar`: one task per stage, with step, loss
    and a smoothed pairs/s (contrastive) or steps/s (MNTP)."""
    tasks: dict[str, int] = {}
    smoothed: dict[str, float] = {}

    def on_step(rec: dict) -> None:
        stage = rec["stage"]
        unit = "pairs" if stage == "contrastive" else "seqs"
        if stage not in tasks:
            tasks[stage] = bar.add(stage, total=rec["total"], completed=rec["step"] - 1, loss=rec["loss"], rate=0.0,
                                   unit=unit)  # fmt: skip
        n = rec.get("pairs", 0) or rec.get("targets", 0)
        rate = n / rec["step_s"] if rec["step_s"] > 0 and stage == "contrastive" else 1 / max(rec["step_s"], 1e-9)
        s = smoothed.get(stage)
        smoothed[stage] = rate if s is None else 0.9 * s + 0.1 * rate
        bar.update(tasks[stage], completed=rec["step"], loss=rec["loss"], rate=smoothed[stage], unit=unit)

    return on_step


def result_table(result: dict, out: Path):
    from rich.table import Table

    t = Table(title=f"finetune-text → {out}", show_lines=False)
    t.add_column("eval set")
    t.add_column("images", justify="right")
    t.add_column("CRA@1 before", justify="right")
    t.add_column("CRA@1 after", justify="right")
    t.add_column("CRA@5 before", justify="right")
    t.add_column("CRA@5 after", justify="right")
    for name, r in result.get("cra", {}).items():
        b, a = r["before"], r["after"]
        t.add_row(name, str(a["n"]), f"{b['cra_top1']:.2f}", f"{a['cra_top1']:.2f}", f"{b['cra_top5']:.2f}",
                  f"{a['cra_top5']:.2f}")  # fmt: skip
    return t


def finetune_text_command(
    ctx: typer.Context,
    model: str = typer.Option(None, "--model", help="Model directory or `minilm` (overrides model.path)."),
    pairs: list[str] = typer.Option(None, "--pairs", help="Captions JSONL/Parquet, a directory, or a text cache."),
    out: Path = typer.Option(..., "--out", help="Output directory (checkpoints, metrics, model/)."),
    config: str = typer.Option(None, "--config", help="configs/NAME.yaml or a path."),
    eval_captions: list[str] = typer.Option(None, "--eval-captions", help="Captions file(s) for CRA during training."),
    steps: int = typer.Option(None, "--steps", help="Contrastive steps: the schedule's length (train.steps)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop this invocation after N steps, with a checkpoint (resumable)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop with a checkpoint after this wall time."),
    num_workers: int = typer.Option(None, "--num-workers", help="Ray Train workers (0: this process)."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join this Ray cluster."),
    prompt_format: str = typer.Option(
        None, "--prompt-format", help="none | llm2vec-llama3 | llm2vec-mistral | llm2vec-qwen2 | llm2vec-gemma2 "
        "(default: the model's; llm2vec-llama3 for a released LLM2CLIP teacher).",
    ),  # fmt: skip
    resume: bool = typer.Option(None, "--resume/--no-resume", help="Default: resume when OUT has a checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard OUT's checkpoints and outputs first."),
    overrides: list[str] = typer.Argument(None, help="Config overrides: section.key=value ..."),
) -> None:
    """Fine-tune a text encoder with a caption-contrastive loss (LLM2CLIP stage 1); writes OUT/model/."""
    from rich.console import Console

    from l2c import outputs
    from l2c.config import given, load_config
    from l2c.progress import ProgressBar
    from l2c.trainer.text.config import FinetuneTextConfig
    from l2c.trainer.text.finetune import RUN_NAMES, finetune_text

    outputs.check(out, "finetune-text", owns=RUN_NAMES, run_ok=True)  # before any work: new, empty or its own run

    flags = given(ctx, {"model.path": ("model", model), "train.steps": ("steps", steps),
                        "train.max_steps": ("max_steps", max_steps), "train.max_minutes": ("max_minutes", max_minutes),
                        "dist.num_workers": ("num_workers", num_workers), "dist.ray_address": ("ray_address", ray_address),
                        "model.prompt_format": ("prompt_format", prompt_format),
                        "data.pairs": ("pairs", [str(p) for p in pairs or []]),
                        "eval.captions": ("eval_captions", [str(p) for p in eval_captions or []])})  # fmt: skip
    cfg = load_config(FinetuneTextConfig, config, list(overrides or []), flags)
    console = Console(stderr=True)
    with ProgressBar(rate=False, fields="loss {loss:.4f}  {rate:.1f} {unit}/s", console=console) as bar:
        result = finetune_text(cfg, out, resume=resume, overwrite=overwrite, on_step=step_reporter(bar))
    console.print(result_table(result, out))
    if result.get("already_finished"):
        console.print(f"[yellow]{out} already holds a finished run of {result['total_steps']} steps[/]")
    if not result.get("complete"):
        console.print(
            f"[yellow]stopped ({result['stopped_by']}) at step {result['steps']} of {result['total_steps']}; "
            "rerun the same command to resume[/]"
        )
    if result.get("finished"):
        console.print(f"model: {result['model']}  (load with --model {result['model']})")
    console.print(f"loss {result['first_loss']} → {result['final_loss']}; plots: {result['plots']}")


def register(app: typer.Typer) -> None:
    app.command("finetune-text")(finetune_text_command)
