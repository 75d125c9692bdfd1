"""`l2c train-vision`: train a vision encoder against a text-embedding cache (one process or Ray Train)."""

from __future__ import annotations

from pathlib import Path

import typer


def run_train_vision(
    images: list[str],
    text_cache: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    workers: int = 0,
    ray_address: str | None = None,
    use_gpu: bool = False,
    progress: bool = True,
) -> dict:
    """The function behind the command: in-process when `workers` is 0, else a Ray Train job."""
    from l2c.config import load_config
    from l2c.trainer.config import TrainConfig

    cfg = load_config(TrainConfig, config, overrides)
    images = images[0] if len(images) == 1 else list(images)
    if workers > 0:
        from l2c.trainer.ray_train import train_with_ray

        return train_with_ray(
            cfg, images, text_cache, out, workers, ray_address, use_gpu, resume, max_steps, max_minutes
        )
    from l2c.trainer.loop import train

    return train(
        cfg,
        images,
        text_cache,
        out,
        resume=resume,
        max_steps=max_steps,
        max_minutes=max_minutes,
        progress=progress,
    )


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="train-vision", show_header=False)
    for key in (
        "run_dir",
        "step",
        "stopped_by",
        "samples_seen",
        "final_loss",
        "images_per_s",
        "data_wait",
        "export",
    ):
        v = summary.get(key)
        table.add_row(key, f"{v:.4g}" if isinstance(v, float) else str(v))
    for k, v in summary.get("skips", {}).items():
        table.add_row(f"skipped: {k}", str(v))
    Console().print(table)


def register_train_vision(app) -> None:
    @app.command(
        "train-vision", context_settings={"allow_extra_args": False, "ignore_unknown_options": False}
    )
    def train_vision_cmd(
        overrides: list[str] = typer.Argument(
            None, help="Config overrides: key=value (e.g. batch_size=64 optim.lr=1e-4)."
        ),
        images: list[str] = typer.Option(
            ..., "--images", help="Image tars: paths, globs, brace ranges, URLs (repeatable)."
        ),
        text_cache: str = typer.Option(
            ..., "--text-cache", help="Text-embedding cache from `l2c embed-captions` (a path or an s3://, gs:// URL)."
        ),
        out: str = typer.Option(..., "--out", help="Run directory (config, metrics, checkpoints, export): a path or an s3://, gs:// URL."),
        config: str = typer.Option(None, "--config", help="configs/NAME.yaml or a path."),
        resume: bool = typer.Option(
            False, "--resume", help="Continue from the run directory's latest checkpoint."
        ),
        max_steps: int = typer.Option(
            None, "--max-steps", help="Stop this invocation after N steps (resumable)."
        ),
        max_minutes: float = typer.Option(
            None, "--max-minutes", help="Stop this invocation after M minutes."
        ),
        workers: int = typer.Option(
            0, "--workers", help="Ray Train workers (DDP); 0 trains in this process."
        ),
        ray_address: str = typer.Option(
            None, "--ray-address", help="Ray cluster to join (default: a local Ray)."
        ),
        use_gpu: bool = typer.Option(False, "--gpu", help="One GPU per Ray Train worker."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Train a vision encoder against cached LLM text vectors (LLM2CLIP); exports RUN_DIR/export."""
        from l2c.cache import CacheError
        from l2c.config import ConfigError
        from l2c.trainer.loop import ResumeError

        try:
            summary = run_train_vision(
                images,
                text_cache,
                out,
                config,
                overrides or [],
                resume,
                max_steps,
                max_minutes,
                workers,
                ray_address,
                use_gpu,
                not no_progress,
            )
        except (CacheError, ConfigError, ResumeError, FileNotFoundError) as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from e
        print_summary(summary)
