"""Progress on any output: plain lines in a log (a final count with the elapsed time, and
intermediate lines with an estimate only every so often), nothing at all when disabled."""

from __future__ import annotations

import io
import re

from prunebench.harness.progress import _clock, progress_bar

FINAL = re.compile(r"^pruning: (\d+)/(\d+) \((\d+:\d\d)\)$")
INTERMEDIATE = re.compile(r"^pruning: (\d+)/(\d+) \((\d+:\d\d), eta (\d+:\d\d)\)$")


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_log_gets_one_final_line_when_the_interval_has_not_passed():
    stream = io.StringIO()
    with progress_bar("pruning", 5, stream=stream, every=3600.0) as advance:
        for _ in range(5):
            advance()
    (line,) = _lines(stream)
    match = FINAL.match(line)
    assert match and match.group(1, 2) == ("5", "5")


def test_a_log_gets_intermediate_lines_with_an_estimate_once_the_interval_passed():
    stream = io.StringIO()
    with progress_bar("pruning", 4, stream=stream, every=0.0) as advance:
        for _ in range(4):
            advance()
    lines = _lines(stream)
    assert len(lines) == 4  # after 1, 2 and 3 of 4 (none at 4/4: the final line says it), then the final line
    assert [INTERMEDIATE.match(line).group(1) for line in lines[:3]] == ["1", "2", "3"]
    assert FINAL.match(lines[3]).group(1, 2) == ("4", "4") and "eta" not in lines[3]


def test_advance_counts_by_n():
    stream = io.StringIO()
    with progress_bar("pruning", 10, stream=stream, every=0.0) as advance:
        advance(3)
        advance(n=7)
    lines = _lines(stream)
    assert INTERMEDIATE.match(lines[0]).group(1, 2) == ("3", "10")
    assert FINAL.match(lines[-1]).group(1, 2) == ("10", "10") and len(lines) == 2


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with progress_bar("pruning", 3, enabled=False, stream=stream, every=0.0) as advance:
        advance()
        advance(n=2)
    assert stream.getvalue() == ""


def test_clock_format():
    assert [_clock(s) for s in (0, 59.4, 61, 600, 3599, 3661)] == ["0:00", "0:59", "1:01", "10:00", "59:59", "1:01:01"]


def test_a_step_reporter_writes_a_line_per_interval_and_nothing_when_disabled():
    import io

    from prunebench.harness.progress import step_reporter

    stream = io.StringIO()
    report = step_reporter(stream=stream, every=0.0)
    report("mask gradients", 1)
    report("mask gradients", 2)
    assert stream.getvalue().splitlines()[-1].startswith("mask gradients: 2 (")
    quiet = io.StringIO()
    silent = step_reporter(enabled=False)
    silent("x", 1)
    assert quiet.getvalue() == ""
