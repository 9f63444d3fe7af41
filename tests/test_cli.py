"""The CLI: bad input exits 2 with one line naming the valid choices, and writes nothing;
a real run on SmolLM2 writes a complete result."""

from __future__ import annotations

import json

import pytest

from prunebench.harness.cli import main
from prunebench.harness.results import TOP_LEVEL_KEYS

FAST = ["--profile", "ci", "--no-zeroshot", "--no-timing", "--quiet"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--method", "nope", "--sparsity", "0.2"], "unknown method 'nope'; valid methods:"),
        (["run", "--method", "wanda-sp", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["run", "--method", "wanda-sp", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--set", "attention=nope"], "valid attention components:"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--set", "ffn.nope=3"], "valid: multiple"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--calibration", "nope"], "unknown data source 'nope'; valid sources:"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--profile", "nope"], "unknown profile 'nope'; valid profiles: ci, offline, paper"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--calibration-samples", "0"], "calibration samples must be at least 1"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--no-zeroshot", "--tasks", "piqa"], "--tasks conflicts with --no-zeroshot"),
        (["run", "--method", "wanda-sp", "--sparsity", "0.2", "--model", "no-such-model"], "no-such-model"),
        (["compare", "--methods", ",", "--sparsities", "0.2"], "--methods is empty"),
        (["compare", "--methods", "wanda-sp", "--sparsities", "x"], "--sparsities expects numbers"),
        (["report", "/nonexistent/results"], "no such result file or folder"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    results = tmp_path / "results"
    extra = ["--results", str(results)] if argv[0] in ("run", "compare") else []
    extra += ["--quiet"] if argv[0] in ("run", "compare") else []
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunebench: error:") and message in err and "\n" not in err
    assert not results.exists()


@pytest.mark.real
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--calibration-seqlen", "100000"], "exceeds the model's context of 8192"),
        (["--calibration-samples", "10000"], "needs at least"),
    ],
)
def test_data_errors_on_the_real_model_write_nothing(tmp_path, capsys, argv, message):
    results = tmp_path / "results"
    code = main(["run", "--method", "wanda-sp", "--sparsity", "0.2", *FAST, "--results", str(results), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not results.exists()


@pytest.mark.real
def test_wanda_sp_run_on_smollm2_writes_a_complete_result(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", "--method", "wanda-sp", "--sparsity", "0.3", *FAST, "--results", str(results)]) == 0
    (path,) = list(results.glob("*.json"))
    data = json.loads(path.read_text())
    assert set(TOP_LEVEL_KEYS) <= set(data)
    assert abs(data["sparsity"]["achieved"] - 0.3) < 0.02
    dense, pruned = data["metrics"]["dense"]["ppl"], data["metrics"]["pruned"]["ppl"]
    for source in ("wiki-offline", "books-offline"):
        assert dense[source] < pruned[source] < float("inf")
    assert data["recipe"]["components"]["ffn"] == {"name": "wanda-sp", "params": {"multiple": 8}}
    assert data["params"]["pruned"]["decoder"] < data["params"]["dense"]["decoder"]
    assert data["environment"]["versions"]["torch"]
    assert not list(results.glob("*.tmp*"))
