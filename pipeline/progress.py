"""A progress bar for shard jobs: shards done, captions/s, tokens/s and an ETA weighted by shard size."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ShardProgress:
    """`advance(bytes, captions, tokens)` once per finished shard; the ETA follows source bytes."""

    def __init__(self, total_bytes: int, n_shards: int, enabled: bool = True, console: Console | None = None):
        self.total, self.n_shards, self.enabled = total_bytes, n_shards, enabled
        self.shards = self.captions = self.tokens = 0
        self.t0 = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]embed"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[shards]}"),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("embed", total=self.total, shards=self._shards(), rates="")
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def _shards(self) -> str:
        return f"{self.shards}/{self.n_shards} shards"

    def advance(self, nbytes: int, captions: int, tokens: int) -> None:
        self.shards += 1
        self.captions += captions
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rates = f"{self.captions / dt:,.0f} captions/s {self.tokens / dt:,.0f} tok/s"
        self.progress.update(self.task, advance=nbytes, shards=self._shards(), rates=rates)
