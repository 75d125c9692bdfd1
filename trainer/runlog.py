"""The run log: `metrics.jsonl`, one JSON record per line, appended by rank 0 and read by both trainers.

The reader skips a line that does not parse (the last line of a run killed mid-write); `rewind` keeps the
records a resumed run's checkpoint covers and drops what a killed run wrote after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from l2c import atomic


def read_metrics(path: str | Path) -> list[dict]:
    """Every whole record of a metrics file ([] when there is none); a line cut short by a crash is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class RunLog:
    """Append-only metrics file; writes only where `enabled` (rank 0), reads anywhere."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def records(self) -> list[dict]:
        return read_metrics(self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, keep: Callable[[dict], bool] | None) -> None:
        """Rewrite the file with the records `keep` accepts (none when `keep` is None: a fresh run)."""
        if not self.enabled:
            return
        kept = [] if keep is None else [r for r in self.records() if keep(r)]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
