"""`logging` for l2c: the `l2c` loggers write `LEVEL l2c.module: message` lines to stderr (CLI and Ray workers)."""

from __future__ import annotations

import logging
import sys


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is at the time (an in-process caller may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the `l2c` logger (once per process) and set its level."""
    log = logging.getLogger("l2c")
    if not log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
