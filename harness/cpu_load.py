"""How busy the machine was while something was timed, apart from the timing process.

A timing ratio means something only on a machine that was otherwise idle during the
measurement (docs/PROTOCOL.md, "Metrics": a timing taken under load is flagged, not claimed).
The load average cannot tell the timed process from the rest, so this reads the CPU
time every process used (``/proc/stat``) and this process used (``/proc/self/stat``)
around the measurement: the difference, over the wall time and the cores, is the share
of the machine's CPU that *other* processes took. Elsewhere than Linux it falls back to
the load average.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

BUSY_SHARE = 0.10
"""Other processes above this share of the machine's CPU make a timing "loaded"."""


@dataclass
class LoadReading:
    """Other processes' share of all cores during a window (None where unknown)."""

    other_share: float | None
    loadavg_1min: float | None
    cores: int
    seconds: float

    @property
    def busy(self) -> bool:
        if self.other_share is not None:
            return self.other_share > BUSY_SHARE
        return self.loadavg_1min is not None and self.loadavg_1min > 1.5 * self.cores

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"busy": self.busy}


def _system_busy_ticks() -> int | None:
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle  # user..softirq, steal; guest time is inside user


def _own_ticks() -> int | None:
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15 of the record)


@contextmanager
def watch_load() -> Iterator[list[LoadReading]]:
    """Yields a list that holds one ``LoadReading`` of the ``with`` block when it ends."""
    out: list[LoadReading] = []
    cores = os.cpu_count() or 1
    start, sys0, own0 = time.perf_counter(), _system_busy_ticks(), _own_ticks()
    try:
        yield out
    finally:
        seconds = time.perf_counter() - start
        sys1, own1 = _system_busy_ticks(), _own_ticks()
        share = None
        if None not in (sys0, sys1, own0, own1) and seconds > 0:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            other = max(0, (sys1 - sys0) - (own1 - own0)) / hz
            share = other / (seconds * cores)
        try:
            loadavg = os.getloadavg()[0]
        except OSError:
            loadavg = None
        out.append(LoadReading(share, loadavg, cores, seconds))
