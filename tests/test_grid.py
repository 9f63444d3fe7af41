"""Grids resume without redoing finished cells, shard cleanly, know cells by content (0.12
and 0.125 are two cells; so are two seeds), and validate every cell before running any."""

from __future__ import annotations

import pytest

from prunebench.harness.errors import UsageError
from prunebench.harness.grid import existing_cells, run_grid
from prunebench.harness.manager import PluginHost
from prunebench.harness.results import write_result
from prunebench.harness.session import RunSession
from prunebench.harness.spec import RunSpec
from prunebench.harness.testing import fake_result


@pytest.fixture(scope="module")
def host():
    return PluginHost()


class FakeRunner:
    """Stands in for run_experiment: records calls, writes a result like the real one."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, float, int]] = []
        self.fail_on = fail_on

    def __call__(self, spec, results_dir, host, show_progress):
        if spec.method == self.fail_on:
            raise KeyboardInterrupt  # an interruption in the middle of the grid
        self.calls.append((spec.method, spec.sparsity, spec.seed))
        result = fake_result(spec, 30.0 + spec.sparsity, host=host)
        result["path"] = str(write_result(RunSession(spec, host=host).result_path(results_dir), result))
        return result


def _specs(methods=("wanda-sp",), sparsities=(0.2, 0.3), seeds=(0,)):
    return [RunSpec(method=m, sparsity=s, seed=seed, profile="ci", zeroshot=False, timing=False)
            for m in methods for s in sparsities for seed in seeds]


def test_interrupted_grid_resumes_without_redoing_finished_runs(tmp_path, host):
    specs = _specs(methods=("wanda-sp", "wanda-sp"), sparsities=(0.2,))
    specs[1].overrides = ["ffn=keep"]
    first = FakeRunner()
    run_grid(specs[:1], tmp_path, host=host, runner=first)
    assert first.calls == [("wanda-sp", 0.2, 0)]
    second = FakeRunner()
    results = run_grid(specs, tmp_path, host=host, runner=second)
    assert second.calls == [("wanda-sp", 0.2, 0)] and len(results) == 2  # only the new cell ran
    third = FakeRunner()
    run_grid(specs, tmp_path, host=host, runner=third)
    assert third.calls == []


def test_sparsities_that_round_alike_are_two_cells_with_two_results(tmp_path, host):
    runner = FakeRunner()
    results = run_grid(_specs(sparsities=(0.12, 0.125)), tmp_path, host=host, runner=runner)
    assert [c[1] for c in runner.calls] == [0.12, 0.125]
    assert len({r["cell"] for r in results}) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    assert len(existing_cells(tmp_path)) == 2


def test_seeds_are_a_grid_axis_with_one_result_per_cell_and_seed(tmp_path, host):
    runner = FakeRunner()
    results = run_grid(_specs(sparsities=(0.3,), seeds=(0, 1, 2)), tmp_path, host=host, runner=runner)
    assert [c[2] for c in runner.calls] == [0, 1, 2]
    assert len({r["cell"] for r in results}) == 3
    assert len({r["spec"]["protocol_id"] for r in results}) == 1  # seeds share a protocol: one table


def test_a_cell_finished_meanwhile_by_another_process_is_read_not_rerun(tmp_path, host):
    specs = _specs(sparsities=(0.2, 0.3))
    other = FakeRunner()

    class FinishesTheNextCellToo(FakeRunner):
        """While running the first cell, 'another process' writes the second one."""

        def __call__(self, spec, results_dir, host, show_progress):
            if not other.calls:
                other(specs[1], results_dir, host, show_progress)
            return super().__call__(spec, results_dir, host, show_progress)

    mine = FinishesTheNextCellToo()
    results = run_grid(specs, tmp_path, host=host, runner=mine)
    assert mine.calls == [("wanda-sp", 0.2, 0)] and other.calls == [("wanda-sp", 0.3, 0)]
    assert [r["sparsity"]["target"] for r in results] == [0.2, 0.3] and "path" in results[1]


def test_shards_split_a_grid_and_cover_it_once(tmp_path, host):
    specs = _specs(sparsities=(0.1, 0.2, 0.3, 0.4))
    a, b = FakeRunner(), FakeRunner()
    run_grid(specs, tmp_path, shard="0/2", host=host, runner=a)
    run_grid(specs, tmp_path, shard="1/2", host=host, runner=b)
    assert sorted(a.calls + b.calls) == [("wanda-sp", s, 0) for s in (0.1, 0.2, 0.3, 0.4)]
    assert not set(a.calls) & set(b.calls)


@pytest.mark.parametrize("shard", ["2/2", "x", "1/0"])
def test_bad_shard_is_refused(tmp_path, host, shard):
    with pytest.raises(UsageError, match="shard"):
        run_grid(_specs(), tmp_path, shard=shard, host=host, runner=FakeRunner())


def test_grid_validates_every_cell_before_running_any(tmp_path, host):
    specs = _specs() + [RunSpec(method="nope", sparsity=0.2, profile="ci")]
    runner = FakeRunner()
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        run_grid(specs, tmp_path, host=host, runner=runner)
    assert runner.calls == []


def test_a_cell_listed_twice_is_refused(tmp_path, host):
    with pytest.raises(UsageError, match="twice"):
        run_grid(_specs(sparsities=(0.2, 0.2)), tmp_path, host=host, runner=FakeRunner())
