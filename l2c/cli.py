"""The `l2c` command line. Each subpackage registers its own commands; `main(argv)` runs one in-process.

One error model for every command: an `L2CError` (bad input or usage) prints one line and exits 2, a
`JobFailed` exits 1; `--debug` (or L2C_DEBUG=1) shows the traceback instead. Messages go through `logging`
(`--log-level`), so a Ray job's log says what happened and at which level.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from l2c.errors import EXIT_FAILED, EXIT_USAGE, L2CError
from l2c.log import setup_logging

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

app = typer.Typer(
    name="l2c",
    help="LLM2CLIP as an embedding-cache pipeline: embed captions once, train vision encoders on the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMAND_MODULES = (
    "l2c.pipeline.commands",  # embed-captions, cache-info
    "l2c.data.commands",  # make-demo-data, make-shards
    "l2c.trainer.vision.commands",  # train-vision
    "l2c.trainer.vision.released",  # export (--format llm2clip-hf | open_clip)
    "l2c.trainer.text.commands",  # finetune-text
    "l2c.eval.commands",  # eval-retrieval, eval-cra, eval-zeroshot
    "l2c.eval.suite",  # eval-suite
    "l2c.apps.submit",  # submit (Ray Job Submission)
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)

_debug = False


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error, not just its line."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """LLM2CLIP as an embedding-cache pipeline: embed captions once, train vision encoders on the cache."""
    global _debug
    _debug = debug or os.environ.get("L2C_DEBUG", "") not in ("", "0")
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise L2CError(f"--log-level {log_level!r}: expected DEBUG, INFO, WARNING or ERROR")
    setup_logging(level)


@app.command("version")
def version() -> None:
    """Print the l2c version."""
    from l2c import __version__

    typer.echo(__version__)


def _fail(message: str, code: int) -> int:
    typer.secho(f"l2c: error: {message}", fg="red", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command in-process, as the console script does; returns the exit status."""
    global _debug
    _debug = False  # set by the root callback from --debug or L2C_DEBUG, before any command runs
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=list(argv or []), prog_name="l2c", standalone_mode=False)
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except ClickException as e:  # usage: a bad option or argument
        e.show()
        return e.exit_code
    except typer.Abort:
        return _fail("aborted", EXIT_FAILED)
    except L2CError as e:
        if _debug:
            raise
        return _fail(str(e), e.code)
    except FileNotFoundError as e:
        if _debug:
            raise
        return _fail(f"{e.strerror or 'not found'}: {e.filename}" if e.filename else str(e), EXIT_USAGE)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def run() -> None:
    """The `l2c` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
