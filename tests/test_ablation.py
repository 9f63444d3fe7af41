"""Cumulative ablations come from the method's declared rows (the core knows no method),
add the uniform-allocation row, run as a resumable grid and land in the right cells."""

from __future__ import annotations

import pytest

from prunebench.harness import grid
from prunebench.harness.ablation import ablation_rows, ablation_specs, ablation_table
from prunebench.harness.cli import main
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.results import write_result
from prunebench.harness.session import RunSession
from prunebench.harness.spec import RunSpec
from prunebench.harness.testing import fake_result


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


class DistinctPplRunner:
    """Each cell gets its own perplexity (100 + 10 * cell index + sparsity), so a
    result placed in the wrong table cell shows up."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], float]] = []

    def __call__(self, spec, results_dir, host, show_progress):
        ppl = 100.0 + 10 * len(self.calls) + spec.sparsity
        self.calls.append((spec.method, tuple(spec.overrides), spec.sparsity))
        result = fake_result(spec, ppl, host=host)
        result["path"] = str(write_result(RunSession(spec, host=host).result_path(results_dir), result))
        return result


def test_intraslice_rows_follow_table_4_then_uniform(host):
    rows = ablation_rows(host, "intraslice")
    assert [r.label for r in rows] == ["Naive", "+Ada-H", "+Pca-A", "+IPca", "+IPca (uniform ratios)"]
    # the last Table-4 row is the full paper method (intraslice itself follows the reference
    # code); the core's extra uniform row swaps that last row's allocation
    assert [r.method for r in rows] == ["intraslice-naive", "intraslice-ada-h", "intraslice-pca-a",
                                        "intraslice-paper-ablation-ipca", "intraslice-paper-ablation-ipca"]
    assert rows[-1].overrides == ("allocation=uniform",)
    assert host.resolve(rows[-1].method, rows[-1].overrides).components["allocation"].name == "uniform"
    assert len(ablation_rows(host, "intraslice", uniform=False)) == 4


def test_methods_without_rows_and_unknown_methods_are_refused(host):
    with pytest.raises(UsageError, match="declares no ablation rows; methods that do: intraslice"):
        ablation_rows(host, "wanda-sp")
    with pytest.raises(UsageError, match="unknown method 'nope'; valid methods:"):
        ablation_rows(host, "nope")


def test_each_result_lands_in_its_row_and_sparsity_column(tmp_path, host):
    rows = ablation_rows(host, "intraslice")
    sparsities = [0.2, 0.3]

    def make(method, s, extra):
        return RunSpec(method=method, sparsity=s, overrides=["importance.loss_chunk=64", *extra], profile="ci",
                       zeroshot=False, timing=False)

    specs = ablation_specs(rows, sparsities, make)
    runner = DistinctPplRunner()
    results = grid.run_grid(specs, tmp_path, host=host, runner=runner, show_progress=False)
    table = ablation_table(rows, sparsities, results, base_overrides=["importance.loss_chunk=64"])
    lines = table.splitlines()
    assert "PPL wiki-offline @20%" in lines[0] and "PPL wiki-offline @30%" in lines[0]
    assert lines[2].split("|")[3].strip() == "20.00"  # the dense row repeats per sparsity
    for i, row in enumerate(rows):
        cells = [c.strip() for c in lines[3 + i].split("|")]
        assert cells[1] == row.label
        assert cells[3] == f"{100 + 10 * (2 * i) + 0.2:.2f}" and cells[4] == f"{100 + 10 * (2 * i + 1) + 0.3:.2f}"
    # Resuming runs nothing and gives the same table.
    again = grid.run_grid(specs, tmp_path, host=host, runner=DistinctPplRunner(), show_progress=False)
    assert ablation_table(rows, sparsities, again, base_overrides=["importance.loss_chunk=64"]) == table


def test_ablate_command_prints_and_writes_the_table(tmp_path, host, monkeypatch, capsys):
    runner = DistinctPplRunner()
    real_run_grid = grid.run_grid
    monkeypatch.setattr(grid, "run_grid", lambda specs, results_dir, **kw: real_run_grid(
        specs, results_dir, runner=runner, **kw))
    out_md = tmp_path / "table.md"
    code = main(["ablate", "--method", "intraslice", "--sparsity", "0.2,0.3", "--profile", "ci", "--no-zeroshot",
                 "--no-timing", "--quiet", "--results", str(tmp_path / "runs"), "--markdown", str(out_md)])
    assert code == 0
    assert len(runner.calls) == 10
    printed = capsys.readouterr().out
    assert "+Pca-A" in printed and "(uniform ratios)" in printed
    assert out_md.read_text().strip() in printed
