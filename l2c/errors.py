"""One error model for every command: `L2CError`, `Stopped` and the exit codes.

Exit codes of every `l2c` command:

    0    done
    1    the job ran and failed (`JobFailed`), or the system refused it: an OS error (permission denied, no
         space left, file too large, read-only file system, ...) ends as one line naming the path and the error
    2    bad input or usage (`L2CError`): one line saying what to change
    130  stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM: one line, "stopped; rerun the same command to
         resume"; what was being written is removed (temp names), what was finished is kept

The CLI prints one line for each (`l2c: error: <message>`) and the traceback only with `--debug`.
"""

from __future__ import annotations

import errno
import os
import re
import signal

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143


class L2CError(Exception):
    """Input or usage that l2c cannot work with: one clear line, exit status `code` (2 by default)."""

    code = EXIT_USAGE

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class JobFailed(L2CError):
    """A job that started and failed (a Ray job, a stage of a pipeline): exit 1."""

    code = EXIT_FAILED


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM) raised in the main thread: it unwinds like Ctrl-C (a KeyboardInterrupt), so
    every `finally` runs, temp files are removed and locks released; the CLI exits 128 + `signum`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def os_error_line(e: OSError) -> str:
    """One line for an OS error: the path, what the error means and its name, e.g.
    `/data/out/shard.parquet: File too large (EFBIG)`."""
    code = e.errno
    what = os.strerror(code) if code else (e.strerror or str(e) or type(e).__name__)
    name = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
    paths = " -> ".join(_final_name(str(p)) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {what}{name}" if paths else f"{what}{name}"


def _final_name(path: str) -> str:
    """The file a temp name (`l2c.atomic`: `.tmp-NAME.XXXXXXXX`, `.tmp-NAME`) was being written as."""
    head, sep, name = path.rpartition("/")
    if not name.startswith(".tmp-"):
        return path
    return head + sep + re.sub(r"\.[a-z0-9_]{8}$", "", name[len(".tmp-") :])


def os_error_in(e: BaseException) -> OSError | None:
    """The OS error behind `e`: itself, its cause or context, or a Ray task's cause; None if there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        e = getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), BaseException) else (
            e.__cause__ or e.__context__)  # fmt: skip
    return None
