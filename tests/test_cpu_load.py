"""How busy the machine was apart from the timed process: the arithmetic of a reading on
known tick counts, the busy threshold, and on Linux a busy loop in another process seen
as load while this process's own work is not."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from prunebench.harness import cpu_load
from prunebench.harness.cpu_load import BUSY_SHARE, LoadReading, watch_load


def test_a_watch_yields_one_reading_when_the_block_ends():
    with watch_load() as readings:
        assert readings == []
        sum(range(1000))
    (reading,) = readings
    assert reading.cores == (os.cpu_count() or 1) and reading.seconds > 0
    assert set(reading.to_dict()) == {"other_share", "loadavg_1min", "cores", "seconds", "busy"}


def test_the_share_is_other_processes_cpu_time_over_wall_time_and_cores(monkeypatch):
    hz = os.sysconf("SC_CLK_TCK")
    system = iter([1000, 1000 + 3 * hz])  # 3 s of CPU on the machine ...
    own = iter([50, 50 + hz])  # ... of which 1 s was this process
    clock = iter([10.0, 12.0])  # over 2 s of wall time
    monkeypatch.setattr(cpu_load, "_system_busy_ticks", lambda: next(system))
    monkeypatch.setattr(cpu_load, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(cpu_load, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(cpu_load.os, "cpu_count", lambda: 4)
    with watch_load() as readings:
        pass
    (reading,) = readings
    assert reading.seconds == 2.0 and reading.cores == 4
    assert reading.other_share == pytest.approx(2.0 / (2.0 * 4))  # 2 s of others' CPU over 8 core-seconds
    assert reading.busy


def test_own_time_above_the_machine_total_counts_as_no_load(monkeypatch):
    system, own, clock = iter([100, 110]), iter([0, 50]), iter([0.0, 1.0])
    monkeypatch.setattr(cpu_load, "_system_busy_ticks", lambda: next(system))
    monkeypatch.setattr(cpu_load, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(cpu_load, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with watch_load() as readings:
        pass
    assert readings[0].other_share == 0.0 and not readings[0].busy


def test_without_proc_the_share_is_unknown(monkeypatch):
    monkeypatch.setattr(cpu_load, "_system_busy_ticks", lambda: None)
    with watch_load() as readings:
        pass
    assert readings[0].other_share is None


def test_the_busy_threshold():
    assert not LoadReading(BUSY_SHARE, None, 4, 1.0).busy
    assert LoadReading(BUSY_SHARE + 0.01, None, 4, 1.0).busy
    assert not LoadReading(0.0, 100.0, 4, 1.0).busy  # a known share wins over the load average
    # without a share: the load average against the cores
    assert LoadReading(None, 6.1, 4, 1.0).busy and not LoadReading(None, 6.0, 4, 1.0).busy
    assert not LoadReading(None, None, 4, 1.0).busy
    assert LoadReading(0.5, None, 2, 1.0).to_dict()["busy"] is True


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.skipif(not Path("/proc/stat").is_file() or not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_another_process_busy_loop_is_load_and_our_own_is_not():
    spin = 0.6  # CPU seconds of work in each window
    with watch_load() as own_busy:
        _spin(spin)
    child = f"import time\nend = time.process_time() + {spin!r}\nwhile time.process_time() < end:\n    pass\n"
    with watch_load() as other_busy:
        subprocess.run([sys.executable, "-c", child], check=True)
    own, other = own_busy[0], other_busy[0]
    # The same work counts as other processes' load only when another process does it. The
    # machine may be loaded by others in both windows, hence a margin rather than absolutes.
    assert other.other_share > 0
    assert other.other_share > own.other_share + 0.1 / other.cores
