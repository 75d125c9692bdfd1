"""The one progress bar of every long job (make-shards, embed-captions, both trainers, the evals).

A rich bar per task: description, bar, count (or bytes), percent, rate, live fields (loss, shards done, ...),
elapsed time and ETA, on stderr. `enabled=False` draws nothing but still counts (callers need no branches);
on a console that is not a terminal (a log file, CI) rich draws no live bar and prints the final state once.

>>> with ProgressBar("images") as bar:
...     bar.add("make-shards", total=len(records))
...     for r in records:
...         bar.advance()
>>> with ProgressBar(fields="loss {loss:.4f}") as bar:
...     bar.add("train", total=steps, loss=float("nan"))
...     bar.update(completed=step, loss=loss)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """The measured rate of the count: `812 images/s`, or `3.1 MB/s` for bytes."""

    def __init__(self, unit: str, as_bytes: bool = False):
        super().__init__()
        self.unit, self.as_bytes = unit, as_bytes

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s", style="progress.data.speed")
        text = f"{filesize.decimal(int(speed))}/s" if self.as_bytes else f"{speed:,.0f} {self.unit}/s"
        return Text(text, style="progress.data.speed")


class FieldsColumn(ProgressColumn):
    """The task's live fields through a format string over their names, e.g. `loss {loss:.4f}`."""

    def __init__(self, template: str):
        super().__init__()
        self.template = template

    def render(self, task: Task) -> Text:
        try:
            return Text(self.template.format(**task.fields))
        except (KeyError, ValueError, TypeError):  # a field not set yet
            return Text("")


class ProgressBar:
    """One bar per task over a count (`unit`, or bytes with `as_bytes`), with optional live `fields`.

    `rate=False` leaves out the measured rate (for bars whose fields carry their own, e.g. a smoothed one).
    `add` returns the task id; `advance` and `update` act on the newest task unless given one.
    `advance(..., tally={"captions": 12})` keeps running totals: fields `captions` and `captions_per_s`.
    """

    def __init__(
        self,
        unit: str = "it",
        *,
        fields: str = "",
        as_bytes: bool = False,
        rate: bool = True,
        enabled: bool = True,
        console: Console | None = None,
    ):
        self.unit = unit
        columns: list[ProgressColumn] = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn() if as_bytes else MofNCompleteColumn(),
            TaskProgressColumn(),
        ]
        if rate:
            columns.append(RateColumn(unit, as_bytes))
        if fields:
            columns.append(FieldsColumn(fields))
        columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=console or Console(stderr=True), disable=not enabled)
        self._last: TaskID | None = None
        self._tallies: dict[TaskID, Counter] = {}

    def __enter__(self) -> ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def add(self, description: str, total: float | None = None, completed: float = 0, **fields) -> TaskID:
        self._last = self.progress.add_task(description, total=total, completed=completed, **fields)
        return self._last

    def _id(self, task: TaskID | None) -> TaskID:
        if task is None:
            if self._last is None:
                raise RuntimeError("ProgressBar: add a task first")
            return self._last
        return task

    def advance(self, n: float = 1, task: TaskID | None = None, *, tally: dict | None = None, **fields) -> None:
        """Add `n` to the count, `tally` to the running totals, and set live fields."""
        tid = self._id(task)
        if tally:
            totals = self._tallies.setdefault(tid, Counter())
            totals.update(tally)
            elapsed = max(self.task(tid).elapsed or 0.0, 1e-9)
            for name, total in totals.items():
                fields[name], fields[f"{name}_per_s"] = total, total / elapsed
        self.progress.update(tid, advance=n, **fields)

    def update(self, task: TaskID | None = None, *, completed: float | None = None, **fields) -> None:
        """Set the count and/or live fields."""
        self.progress.update(self._id(task), completed=completed, **fields)

    def task(self, task: TaskID | None = None) -> Task:
        """The rich task (its `completed`, `total`, `fields`, `speed`)."""
        tid = self._id(task)
        return next(t for t in self.progress.tasks if t.id == tid)


@contextmanager
def track(description: str, total: float | None, unit: str = "it", **options) -> Iterator[Callable[[float], None]]:
    """A one-task `ProgressBar` (`options` as there); yields its `advance(n)`, for `progress=` callbacks."""
    with ProgressBar(unit, **options) as bar:
        bar.add(description, total=total)
        yield bar.advance
