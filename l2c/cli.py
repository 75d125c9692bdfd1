"""The `l2c` command line. Each subpackage registers its own commands; `main(argv)` runs one in-process.

One error model for every command (`l2c.errors` documents the exit codes): an `L2CError` (bad input or usage)
prints one line and exits 2, a `JobFailed` exits 1, an OS error (permission denied, no space, file too large)
one line naming the path and exit 1; SIGINT and SIGTERM stop the command through Python (temp files removed,
locks released) with one line and exit 130 / 143. `--debug` (or L2C_DEBUG=1) shows the traceback instead.
Messages go through `logging` (`--log-level`), so a Ray job's log says what happened and at which level.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

import typer

from l2c.errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    L2CError,
    Stopped,
    os_error_in,
    os_error_line,
)
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


def _stopped(signum: int) -> int:
    typer.secho(f"l2c: stopped by {signal.Signals(signum).name}; rerun the same command to resume", fg="yellow",
                err=True)  # fmt: skip
    return 128 + signum


_signalled: list[int] = []  # the stop signals this command received (typer answers Ctrl-C with a bare 130)


@contextmanager
def _signals_stop():
    """SIGINT and SIGTERM raise `Stopped` (a KeyboardInterrupt) in the main thread, so every `finally` runs
    (temp files removed, locks released); a second SIGTERM ends the process at once."""
    _signalled.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        _signalled.append(signum)
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    """Run one command in-process, as the console script does; returns the exit status."""
    global _debug
    _debug = False  # set by the root callback from --debug or L2C_DEBUG, before any command runs
    command = typer.main.get_command(app)
    try:
        with _signals_stop():
            rv = command.main(args=list(argv or []), prog_name="l2c", standalone_mode=False)
        if _signalled and rv == EXIT_SIGINT:  # typer returns 130 for any KeyboardInterrupt
            return _stopped(_signalled[0])
    except typer.Exit as e:
        return int(e.exit_code or 0)
    except ClickException as e:  # usage: a bad option or argument
        e.show()
        return e.exit_code
    except typer.Abort as e:  # click turns Ctrl-C (and our SIGTERM, a KeyboardInterrupt) into Abort
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _stopped(getattr(e.__cause__, "signum", signal.SIGINT))
        return _fail("aborted", EXIT_FAILED)
    except KeyboardInterrupt as e:
        return _stopped(getattr(e, "signum", signal.SIGINT))
    except SystemExit as e:  # a SIGTERM handler of the trainer (143) or of Ray's driver (exit 15)
        if e.code in (EXIT_SIGINT, EXIT_SIGTERM, signal.SIGTERM) and not _debug:
            return _stopped(signal.SIGINT if e.code == EXIT_SIGINT else signal.SIGTERM)
        raise
    except L2CError as e:
        if _debug:
            raise
        return _fail(str(e), e.code)
    except FileNotFoundError as e:
        if _debug:
            raise
        return _fail(f"{e.strerror or 'not found'}: {e.filename}" if e.filename else str(e), EXIT_USAGE)
    except Exception as e:  # an OS error, however wrapped: one line naming the path and the error
        found = e if isinstance(e, OSError) else os_error_in(e)
        if _debug or found is None:
            raise
        return _fail(os_error_line(found), EXIT_FAILED)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def run() -> None:
    """The `l2c` console script."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
