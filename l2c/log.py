"""`logging` for l2c: the `l2c` loggers write `LEVEL l2c.module: message` lines to stderr (CLI and Ray workers)."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the `l2c` logger (once per process) and set its level."""
    log = logging.getLogger("l2c")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
