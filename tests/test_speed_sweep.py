"""scripts/speed_sweep.py: folder labels, the method x sparsity pivot, and re-rendering a
saved sweep without timing anything (the timing itself is covered by test_timing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "speed_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("speed_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method: str, target: float | None, value: float) -> dict:
    columns = {"prefill": value, "decode": value + 0.1, "layer prefill": value - 0.1, "layer decode": value}
    return {"method": method, "target": target, "folder": f"{method}_{target}", "achieved": target or 0.0,
            "attention_kept": 0.5, "attention_core_kept": 0.4, "kv_cache_kept": 0.3, **columns}


def test_label_of_reads_method_and_sparsity(sweep):
    assert sweep.label_of(Path("/m/svd-llm_0.4")) == ("svd-llm", 0.4)
    assert sweep.label_of(Path("/m/dense")) == ("dense", None)


def test_pivot_orders_methods_fastest_first_and_marks_gaps(sweep):
    # "slow" has a fast 40% cell that "fast" lacks: ranked on the shared 20% column only.
    rows = [_row("slow", 0.2, 0.9), _row("slow", 0.4, 0.1), _row("fast", 0.2, 0.6), _row("odd", None, 0.1)]
    text = sweep.pivot_markdown(rows, "prefill")
    lines = text.strip().splitlines()
    assert lines[0] == "| prefill x | 20% | 40% |"
    assert lines[2] == "| fast | 0.600 | - |"
    assert lines[3] == "| slow | 0.900 | 0.100 |"
    assert "odd" not in text  # a folder without a sparsity in its name has no column


def test_from_json_rerenders_tables_and_plot(sweep, tmp_path, monkeypatch):
    saved = tmp_path / "speed.json"
    saved.write_text(json.dumps({"rows": [_row("a", 0.2, 0.7), _row("b", 0.2, 0.8)]}))
    out, png = tmp_path / "table.md", tmp_path / "speed.png"
    argv = ["speed_sweep.py", "--from-json", str(saved), "--pivot", "layer prefill",
            "--markdown", str(out), "--plot", str(png)]
    monkeypatch.setattr(sys, "argv", argv)
    assert sweep.main() == 0
    text = out.read_text()
    assert "| a | 0.20 | 0.200 |" in text  # the full table
    assert "| layer prefill x | 20% |" in text and "| a | 0.600 |" in text  # the pivot
    assert png.stat().st_size > 0


def test_needs_models_or_saved_sweep(sweep, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["speed_sweep.py"])
    with pytest.raises(SystemExit):
        sweep.main()
