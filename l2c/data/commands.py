"""Data commands: make-demo-data, make-shards. Heavy imports stay inside the command bodies."""

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
        preview: bool = typer.Option(False, "--preview", help="Also write OUT/preview.png, a grid of samples."),
    ) -> None:
        """Generate procedural scenes (coloured shapes) with short and dense captions as webdataset shards."""
        from l2c.data.demo_data import (
            DemoDataConfig,
            contact_sheet,
            make_demo_data,
            print_summary,
        )

        cfg = DemoDataConfig(n=n, val_n=val_n, image_size=image_size, shard_size=shard_size, seed=seed,
                             min_objects=min_objects, max_objects=max_objects, image_format=image_format)
        info = make_demo_data(out, cfg, overwrite=overwrite)
        print_summary(info, out)
        if preview:
            typer.echo(f"preview: {contact_sheet(out, out / 'preview.png')}")


def _register_make_shards(app) -> None:
    @app.command("make-shards")
    def make_shards_cmd(
        images_dir: Path = typer.Argument(..., help="Folder of images named by the captions records."),
        captions: Path = typer.Option(..., "--captions", help="JSONL, one record per image."),
        out: Path = typer.Option(..., "--out", help="Output directory for shard-NNNNNN.tar, rejected.jsonl, info.json."),
        shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
        image_field: str = typer.Option("file", "--image-field", help="Record field with the image file name."),
        key_field: str = typer.Option("image_id", "--key-field", help="Record field with the unique sample id."),
        caption_field: str = typer.Option("captions", "--caption-field", help="Record field with the caption(s)."),
        max_side: int | None = typer.Option(None, "--max-side", help="Re-encode images whose longer side exceeds N."),
        quality: int = typer.Option(90, "--quality", help="JPEG quality when re-encoding."),
        strict: bool = typer.Option(False, "--strict", help="Fail on the first bad record instead of rejecting it."),
        workers: int = typer.Option(0, "--workers", help="Image-reading threads (0: up to 4, one per core)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards made from other inputs."),
    ) -> None:
        """Convert a folder of images plus a captions JSONL into webdataset shards; bad records are reported."""
        from l2c.data.make_shards import MakeShardsConfig, make_shards, print_summary

        cfg = MakeShardsConfig(shard_size=shard_size, image_field=image_field, key_field=key_field,
                               caption_field=caption_field, max_side=max_side, jpeg_quality=quality, strict=strict)
        if workers > 0:
            cfg.workers = workers
        info = make_shards(images_dir, captions, out, cfg, overwrite=overwrite)
        print_summary(info, out)


def register(app) -> None:
    _register_demo_data(app)
    _register_make_shards(app)
