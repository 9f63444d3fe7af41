"""harness/speed.py (``prunebench speed``): what a saved model is comes from its
provenance, the method x sparsity pivot, re-rendering a saved sweep without timing, and
one real sweep of two tiny saved models (the timing itself is covered by test_timing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunebench.harness.cli import main
from prunebench.harness.speed import pivot_markdown, provenance_of


def _row(method: str, target: float | None, value: float) -> dict:
    columns = {"prefill": value, "decode": value + 0.1, "layer prefill": value - 0.1, "layer decode": value}
    return {"method": method, "target": target, "folder": f"{method}_{target}", "achieved": target or 0.0,
            "attention_kept": 0.5, "attention_core_kept": 0.4, "kv_cache_kept": 0.3, "label_from": "config", **columns}


def test_a_saved_model_says_what_it_is_through_its_provenance(tmp_path):
    folder = tmp_path / "anything"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"provenance": {"method": "sobp", "target": 0.3, "achieved": 0.301}}))
    assert provenance_of(folder) | {} == {"method": "sobp", "target": 0.3, "achieved": 0.301, "source": "config"}


def test_an_older_model_without_provenance_falls_back_to_its_folder_name(tmp_path):
    for name, want in (("svd-llm_0.4", ("svd-llm", 0.4)), ("dense", ("dense", None))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        p = provenance_of(folder)
        assert (p["method"], p["target"], p["source"]) == (*want, "folder name")


def test_pivot_orders_methods_fastest_first_and_marks_gaps():
    # "slow" has a fast 40% cell that "fast" lacks: ranked on the shared 20% column only.
    rows = [_row("slow", 0.2, 0.9), _row("slow", 0.4, 0.1), _row("fast", 0.2, 0.6), _row("odd", None, 0.1)]
    lines = pivot_markdown(rows, "prefill").strip().splitlines()
    assert lines[0] == "| prefill x | 20% | 40% |"
    assert lines[2] == "| fast | 0.600 | - |"
    assert lines[3] == "| slow | 0.900 | 0.100 |"
    assert "odd" not in "\n".join(lines)


def test_from_json_rerenders_tables_and_plot(tmp_path):
    saved = tmp_path / "speed.json"
    saved.write_text(json.dumps({"rows": [_row("a", 0.2, 0.7), _row("b", 0.2, 0.8)]}))
    out, png = tmp_path / "table.md", tmp_path / "speed.png"
    assert main(["speed", "--from-json", str(saved), "--pivot", "layer prefill", "--markdown", str(out),
                 "--plot", str(png)]) == 0
    text = out.read_text()
    assert "| a | 0.20 | 0.200 |" in text  # the full table
    assert "| layer prefill x | 20% |" in text and "| a | 0.600 |" in text  # the pivot
    assert png.stat().st_size > 0


def test_needs_models_or_a_saved_sweep(capsys):
    assert main(["speed"]) == 2
    assert "saved model folders" in capsys.readouterr().err
    assert main(["speed", "--from-json", "x.json", "--pivot", "nope"]) != 0


@pytest.mark.real
def test_a_sweep_of_saved_models_labels_them_from_their_provenance(tmp_path, capsys):
    """Two tiny runs saved with --save, then timed together against their dense model."""
    folders = []
    for method in ("wanda-sp", "flap"):
        folder = tmp_path / f"m-{method}"
        assert main(["run", "--method", method, "--sparsity", "0.3", "--profile", "ci", "--no-zeroshot", "--no-timing",
                     "--calibration-samples", "4", "--calibration-seqlen", "64", "--eval-samples", "1",
                     "--eval-seqlen", "64", "--results", str(tmp_path / "r"), "--save", str(folder), "--quiet"]) == 0
        folders.append(folder)
    sweep = tmp_path / "speed.json"
    assert main(["speed", *map(str, folders), "--profile", "ci", "--shapes-only", "--json", str(sweep), "--quiet"]) == 0
    rows = json.loads(Path(sweep).read_text())["rows"]
    assert {(r["method"], r["target"], r["label_from"]) for r in rows} == {("wanda-sp", 0.3, "config"), ("flap", 0.3, "config")}
    assert all(0.25 < r["achieved"] < 0.35 for r in rows)
