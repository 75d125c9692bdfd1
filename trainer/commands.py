"""Trainer commands: make-demo-data, make-shards, train-vision. Heavy imports stay inside the command bodies."""

from __future__ import annotations

from pathlib import Path

import typer


def _register_demo_data(app) -> None:
    @app.command("make-demo-data")
    def make_demo_data_cmd(
        out: Path = typer.Argument(..., help="Output directory: OUT/train, OUT/val, OUT/classes.txt, OUT/info.json."),
        n: int = typer.Option(5000, "--n", help="Training images."),
        val_n: int = typer.Option(500, "--val-n", help="Held-out images (own random stream, disjoint keys)."),
        image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
        shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
        seed: int = typer.Option(0, "--seed", help="Random seed; the data is a pure function of it."),
        min_objects: int = typer.Option(1, "--min-objects", help="Fewest shapes per scene."),
        max_objects: int = typer.Option(3, "--max-objects", help="Most shapes per scene (at most 4)."),
        image_format: str = typer.Option("jpg", "--format", help="Image member: jpg or png."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace data made with other settings."),
    ) -> None:
        """Generate procedural scenes (coloured shapes) with short and dense captions as webdataset shards."""
        from l2c.trainer.demo_data import DemoDataConfig, DemoDataError, make_demo_data, print_summary

        cfg = DemoDataConfig(n=n, val_n=val_n, image_size=image_size, shard_size=shard_size, seed=seed,
                             min_objects=min_objects, max_objects=max_objects, image_format=image_format)
        try:
            info = make_demo_data(out, cfg, overwrite=overwrite)
        except DemoDataError as e:
            raise typer.BadParameter(str(e)) from e
        print_summary(info, out)


def register(app) -> None:
    _register_demo_data(app)
