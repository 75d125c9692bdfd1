"""Data commands: make-demo-data, make-shards. Heavy imports stay inside the command bodies."""

from __future__ import annotations

from pathlib import Path

import typer

# what make-demo-data writes in OUT (a folder holding only these is its own earlier output)
DEMO_NAMES = ("train", "val", "classes.txt", "templates.txt", "info.json", "preview.png")


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
        from l2c import outputs
        from l2c.data.demo_data import (
            DemoDataConfig,
            contact_sheet,
            make_demo_data,
            print_summary,
        )

        cfg = DemoDataConfig(n=n, val_n=val_n, image_size=image_size, shard_size=shard_size, seed=seed,
                             min_objects=min_objects, max_objects=max_objects, image_format=image_format)
        outputs.check(out, "make-demo-data", owns=DEMO_NAMES, option="OUT")  # before any work
        info = make_demo_data(out, cfg, overwrite=overwrite)
        outputs.mark(out, "make-demo-data")
        print_summary(info, out)
        if preview:
            typer.echo(f"preview: {contact_sheet(out, out / 'preview.png')}")


_HINTS = {
    "missing_image_field": "the records lack the image field: pass --image-field NAME (e.g. file_name)",
    "missing_key": "the records lack the key field: pass --key-field NAME or --key-from-file-name "
                   "(and --image-field NAME when the file name is not in 'file')",
    "invalid_key": "the keys carry '.', '/' or spaces (file names?): pass --key-from-file-name",
    "missing_file": "the images are not where the records say: check IMAGES_DIR",
}


def _nothing_written(info: dict, out: Path) -> str:
    reasons = info.get("rejected_by_reason") or {}
    top = max(reasons, key=reasons.get) if reasons else None
    why = f"; most rejects are {top} ({reasons[top]}): {_HINTS.get(top, 'see ' + str(out / 'rejected.jsonl'))}" \
        if top else ""
    return f"make-shards wrote nothing to {out}: {info['records']} record(s), 0 written{why}"


def _register_make_shards(app) -> None:
    @app.command("make-shards")
    def make_shards_cmd(
        images_dir: Path = typer.Argument(..., help="Folder of images named by the captions records."),
        captions: Path | None = typer.Option(
            None, "--captions", help="Captions JSONL, one record per image; with --format, the set's annotation "
            "file (Urban1k: optional, its caption/ folder; imagenet: the class-names file)."),
        out: Path = typer.Option(..., "--out", help="Output folder for shard-NNNNNN.tar, rejected.jsonl, "
                                 "info.json: new, empty, or an earlier make-shards output."),
        fmt: str = typer.Option("jsonl", "--format", help="Annotation layout: jsonl, karpathy, retrieval-json, "
                                "sharegpt4v, urban1k, docci, imagenet, xm3600 (see README)."),
        subset: str | None = typer.Option(None, "--subset", help="With --format: the official split(s) to take "
                                          "(karpathy, docci: test), first N (sharegpt4v: 1000) or language "
                                          "(xm3600: en); 'all' for everything."),
        shard_size: int = typer.Option(1000, "--shard-size", help="Samples per tar shard."),
        image_field: str = typer.Option("file", "--image-field", help="Record field with the image file name."),
        key_field: str = typer.Option("image_id", "--key-field", help="Record field with the unique sample id."),
        key_from_file_name: bool = typer.Option(
            False, "--key-from-file-name", help="Key = the image file name without its suffix ('.', '/', spaces → '_')."),
        caption_field: str = typer.Option("captions", "--caption-field", help="Record field with the caption(s)."),
        select: Path | None = typer.Option(None, "--select", help="File of keys or image file names, one a line: "
                                           "only those records; the other images are not rejects."),
        split: list[str] = typer.Option([], "--split", help="NAME=FRACTION (repeat): write OUT/NAME for each part, "
                                        "records assigned by a hash of their key; the other parts' images are not rejects."),
        max_side: int | None = typer.Option(None, "--max-side", help="Re-encode images whose longer side exceeds N."),
        quality: int = typer.Option(90, "--quality", help="JPEG quality when re-encoding."),
        strict: bool = typer.Option(False, "--strict", help="Fail on the first bad record instead of rejecting it."),
        workers: int = typer.Option(0, "--workers", help="Image-reading threads (0: up to 4, one per core)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards made from other inputs."),
    ) -> None:
        """Convert a folder of images plus captions (a JSONL or a dataset's own layout) into webdataset shards.

        Bad records are counted and listed; exits 2 when nothing was written."""
        from l2c import outputs
        from l2c.data.importers import FORMAT_NAMES, parse_splits
        from l2c.data.make_shards import OUTPUT_NAMES, MakeShardsConfig, make_shards, print_summary
        from l2c.errors import L2CError

        if fmt not in FORMAT_NAMES:
            raise L2CError(f"unknown --format {fmt!r}; one of {', '.join(FORMAT_NAMES)}")
        if fmt == "jsonl" and captions is None:
            raise L2CError("--captions is required (the captions JSONL)")
        if fmt != "jsonl" and (image_field, key_field, caption_field) != ("file", "image_id", "captions"):
            raise L2CError(f"--format {fmt} reads the set's own fields: drop --image-field, --key-field, --caption-field")
        if fmt == "jsonl" and subset is not None:
            raise L2CError("--subset applies to --format other than jsonl; use --select or --split")
        parts = [name for name, _ in parse_splits(split)] if split else [None]
        cfg = MakeShardsConfig(shard_size=shard_size, image_field=image_field, key_field=key_field,
                               caption_field=caption_field, max_side=max_side, jpeg_quality=quality, strict=strict,
                               format=fmt, subset=subset, key_from_file_name=key_from_file_name,
                               select=str(select) if select is not None else None,
                               split=",".join(split) if split else None)
        if workers > 0:
            cfg.workers = workers
        outs = [out / part if part is not None else out for part in parts]
        if split:  # OUT holds the parts: its own when it holds only them
            outputs.check(out, "make-shards", owns=tuple(parts))
        for part_out in outs:  # before any work: never a file, a run, a cache or a folder of other files
            outputs.check(part_out, "make-shards", owns=OUTPUT_NAMES)
        empty = []
        for part, part_out in zip(parts, outs, strict=True):
            cfg.split_name = part
            info = make_shards(images_dir, captions, part_out, cfg, overwrite=overwrite)
            outputs.mark(part_out, "make-shards", "shards")
            print_summary(info, part_out)
            if info.get("selected_out"):
                typer.echo(f"{info['selected_out']} record(s) outside the subset/selection: not written, not rejects")
            if info.get("select_missing"):
                typer.echo(f"{info['select_missing']} --select entr(y/ies) named no record")
            if info["written"] == 0:
                empty.append(_nothing_written(info, part_out))
        if split:
            outputs.mark(out, "make-shards", "split")
        if empty:
            raise L2CError("; ".join(empty))


def register(app) -> None:
    _register_demo_data(app)
    _register_make_shards(app)
