"""Progress of long work (calibration, the layer loop, evaluation) on any output.

On a terminal: a rich progress bar on stderr (stdout stays clean for results). In a log
(stderr not a terminal: nohup, CI, a grid worker) a bar shows nothing until it ends, so
plain lines are printed instead, at most every ``LOG_EVERY_S`` seconds and at the end,
with the count, the elapsed time and an estimate of what is left. A disabled progress
(tests, ``--quiet``) costs nothing. The context manager yields ``advance(n=1)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

LOG_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


@contextmanager
def _log_lines(description: str, total: int, stream: TextIO, every: float) -> Iterator[Callable[[int], None]]:
    start = last = time.perf_counter()
    done = 0

    def line(final: bool = False) -> None:
        elapsed = time.perf_counter() - start
        eta = "" if final or not done else f", eta {_clock(elapsed / done * (total - done))}"
        stream.write(f"{description}: {done}/{total} ({_clock(elapsed)}{eta})\n")
        stream.flush()

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= every and done < total:
            last = now
            line()

    yield advance
    line(final=True)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, stream: TextIO | None = None,
                 every: float = LOG_EVERY_S) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n=1: None
        return
    stream = stream or sys.stderr
    if not stream.isatty():
        with _log_lines(description, total, stream, every) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(file=stream), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def step_reporter(enabled: bool = True, stream: TextIO | None = None, every: float = LOG_EVERY_S) -> Callable[[str, int], None]:
    """A ``(description, count)`` callback for work whose total the caller does not know
    (``RunContext.progress``: e.g. gradient samples): a plain line at most every ``every``
    seconds per description, on a terminal or in a log alike."""
    if not enabled:
        return lambda description, count: None
    stream = stream or sys.stderr
    start: dict[str, float] = {}
    last: dict[str, float] = {}

    def report(description: str, count: int) -> None:
        now = time.perf_counter()
        start.setdefault(description, now)
        if now - last.get(description, start[description]) >= every:
            last[description] = now
            stream.write(f"{description}: {count} ({_clock(now - start[description])})\n")
            stream.flush()

    return report
