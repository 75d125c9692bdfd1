"""One error model for every command: `L2CError` and its exit codes.

Bad input or usage raises an `L2CError` (exit 2); a job that ran and failed raises `JobFailed` (exit 1).
The CLI prints one line for either (`l2c: <message>`) and the traceback only with `--debug`.
"""

from __future__ import annotations

EXIT_FAILED, EXIT_USAGE = 1, 2


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
