"""The `l2c` command line. Each subpackage registers its own commands; `main(argv)` runs one in-process."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="l2c",
    help="LLM2CLIP as an embedding-cache pipeline: embed captions once, train vision encoders on the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

COMMAND_MODULES = (
    "l2c.pipeline.commands",  # embed-captions, cache-info
    "l2c.trainer.commands",  # make-demo-data, make-shards, train-vision
    "l2c.trainer.text_commands",  # finetune-text
    "l2c.eval.commands",  # eval-retrieval, eval-cra, eval-zeroshot
    "l2c.submit",  # submit (Ray Job Submission)
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


@app.command("version")
def version() -> None:
    """Print the l2c version."""
    from l2c import __version__

    typer.echo(__version__)


def main(argv: list[str] | None = None) -> int:
    """Run one command in-process, as the console script would (for tests and notebooks)."""
    import click

    command = typer.main.get_command(app)
    try:
        rv = command.main(args=list(argv or []), prog_name="l2c", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


if __name__ == "__main__":
    app()
