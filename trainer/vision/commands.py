"""`l2c train-vision`: train a vision encoder against a text-embedding cache (one process or Ray Train)."""

from __future__ import annotations

import typer


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


def register(app) -> None:
    @app.command(
        "train-vision", context_settings={"allow_extra_args": False, "ignore_unknown_options": False}
    )
    def train_vision_cmd(
        overrides: list[str] = typer.Argument(
            None, help="Config overrides: key=value (e.g. batch_size=64 optim.lr=1e-4)."
        ),
        images: list[str] = typer.Option(
            None, "--images", help="Image tars: paths, globs, brace ranges, URLs (repeatable); with --image-cache, "
            "default: the tars the image cache was made from."
        ),
        image_cache: str = typer.Option(
            None, "--image-cache", help="A frozen tower's features from `l2c embed-images`, used instead of decoding "
            "images (needs model.vision.frozen=true and model.vision.pretrained=the cache's tower)."
        ),
        text_cache: str = typer.Option(
            ..., "--text-cache", help="Text-embedding cache from `l2c embed-captions` (a path or an s3://, gs:// URL)."
        ),
        out: str = typer.Option(..., "--out", help="Run directory (config, metrics, checkpoints, export): a path or an s3://, gs:// URL."),
        config: str = typer.Option(None, "--config", help="configs/NAME.yaml or a path."),
        resume: bool = typer.Option(
            None, "--resume/--no-resume", help="Default: continue from OUT's latest checkpoint when it has one; "
            "--resume requires one, --no-resume refuses them (see --overwrite)."
        ),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Remove what an earlier train-vision wrote into OUT, then start afresh."
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
        from l2c import outputs
        from l2c.config import load_config
        from l2c.storage import is_url
        from l2c.trainer.job import TrainJob
        from l2c.trainer.vision.config import TrainConfig
        from l2c.trainer.vision.loop import RUN_NAMES, run_train_vision

        if not is_url(out):  # before any work: a new or empty folder, or a run of its own (it resumes)
            outputs.check(out, "train-vision", owns=RUN_NAMES, run_ok=True)
        cfg = load_config(TrainConfig, config, overrides or [])
        images = (images[0] if len(images) == 1 else list(images)) if images else None
        job = TrainJob(cfg, images, text_cache, out, resume=resume, overwrite=overwrite, image_cache=image_cache,
                       max_steps=max_steps, max_minutes=max_minutes, workers=workers, ray_address=ray_address,
                       use_gpu=use_gpu, progress=not no_progress)  # fmt: skip
        print_summary(run_train_vision(job))
