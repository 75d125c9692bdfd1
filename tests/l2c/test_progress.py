"""The one progress bar (l2c/progress.py): what it counts and shows, on a console that is not a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from l2c.progress import ProgressBar, track


def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, force_terminal=False), buf


def test_count_rate_fields_and_final_line():
    con, buf = console()
    with ProgressBar("img", fields="loss {loss:.4f}  {ips:.0f} img/s", console=con) as bar:
        task = bar.add("train", total=10, completed=2, loss=float("nan"), ips=0.0)
        for step in range(3, 11):
            bar.update(task, completed=step, loss=1 / step, ips=100.0 * step)
    t = bar.task()
    assert (t.completed, t.total, t.finished) == (10, 10, True)
    assert t.fields == {"loss": pytest.approx(0.1), "ips": 1000.0}
    out = buf.getvalue()
    assert "\x1b[" not in out and out.count("\n") == 1  # not a terminal: the final state, once, no escapes
    assert "train" in out and "10/10" in out and "100%" in out and "loss 0.1000  1000 img/s" in out
    assert "img/s" in out and "ETA" in out


def test_tasks_are_separate_and_advance_defaults_to_the_newest():
    con, buf = console()
    with ProgressBar("images", console=con) as bar:
        train = bar.add("train", total=5)
        val = bar.add("val", total=3)
        for _ in range(5):
            bar.advance(1, train)
        bar.advance(2)  # the newest task
    assert (bar.task(train).completed, bar.task(val).completed, bar.task(val).total) == (5, 2, 3)
    out = buf.getvalue().splitlines()
    assert len(out) == 2 and "5/5" in out[0] and "2/3" in out[1]


def test_bytes_and_tallied_rates():
    con, buf = console()
    fields = "{shards}/{n_shards} shards  {captions_per_s:,.0f} captions/s"
    with ProgressBar(as_bytes=True, rate=False, fields=fields, console=con) as bar:
        bar.add("embed", total=3_000_000, shards=0, n_shards=3, captions_per_s=0)
        for _ in range(2):
            bar.advance(1_000_000, tally={"shards": 1, "captions": 50, "tokens": 700})
    t = bar.task()
    assert t.completed == 2_000_000 and t.fields["shards"] == 2 and t.fields["captions"] == 100
    assert t.fields["tokens"] == 1400 and t.fields["captions_per_s"] >= 100 / t.elapsed  # measured at the advance
    assert t.fields["tokens_per_s"] == pytest.approx(14 * t.fields["captions_per_s"])
    out = buf.getvalue()
    assert "2.0/3.0 MB" in out and "2/3 shards" in out and "captions/s" in out


def test_disabled_draws_nothing_but_counts():
    con, buf = console()
    with ProgressBar(enabled=False, console=con) as bar:
        bar.add("x", total=4)
        bar.advance(3)
    assert buf.getvalue() == "" and bar.task().completed == 3


def test_missing_field_renders_empty_and_track_yields_advance():
    con, buf = console()
    with track("search", None, "queries", fields="{later}", console=con) as advance:
        advance(7)
        advance(5)
    out = buf.getvalue()
    assert "search" in out and "12/?" in out and "{later}" not in out


def test_advance_before_add_is_an_error():
    with pytest.raises(RuntimeError, match="add a task first"), ProgressBar(enabled=False) as bar:
        bar.advance()
