"""Grid executors: Ray (local instance, two workers) and Slurm (submitit's debug cluster)
give the results of the in-process executor, write them to the same store, and report a
cell that fails twice instead of dropping it."""

from __future__ import annotations

import pytest

from prunebench.harness.api import RunSpec
from prunebench.harness.errors import UsageError
from prunebench.harness.executors import (
    GridFailure,
    RayExecutor,
    Resources,
    SlurmExecutor,
    make_executor,
)
from prunebench.harness.grid import run_grid
from prunebench.harness.results import load_results

SMALL = {"calibration_samples": 2, "calibration_seqlen": 64, "eval_samples": 2, "eval_seqlen": 64,
         "eval_sources": ["wiki-offline"]}


def _spec(method: str, **profile) -> RunSpec:
    return RunSpec(method=method, sparsity=0.3, profile="ci", profile_overrides={**SMALL, **profile},
                   zeroshot=False, timing=False)


def _by_method(results: list[dict]) -> dict[str, dict]:
    return {r["spec"]["method"]: r for r in results}


def _same(a: dict, b: dict) -> None:
    assert a["spec"]["protocol_id"] == b["spec"]["protocol_id"]
    assert a["sparsity"]["achieved"] == b["sparsity"]["achieved"]
    assert a["pruning"]["layers"] == b["pruning"]["layers"]  # the same units kept
    # Workers may use another thread count, so sums can round differently in the last bits.
    assert a["metrics"]["pruned"]["ppl"]["wiki-offline"] == pytest.approx(b["metrics"]["pruned"]["ppl"]["wiki-offline"], rel=1e-4)


def test_unknown_executor_names_the_valid_ones():
    with pytest.raises(UsageError, match="unknown executor 'dask'; valid executors: local, ray, slurm"):
        make_executor("dask")


@pytest.mark.real
def test_ray_grid_matches_in_process_and_reports_a_failing_cell(tmp_path, host):
    pytest.importorskip("ray")
    specs = [_spec("wanda-sp"), _spec("flap")]
    local = run_grid(specs, tmp_path / "local", show_progress=False, host=host)

    bad = _spec("wanda-sp", calibration_samples=100000)  # fails inside the worker (too little text), twice
    with pytest.raises(GridFailure) as failure:
        run_grid([*specs, bad], tmp_path / "ray", show_progress=False, host=host,
                 executor=RayExecutor(workers=2, resources=Resources(cpus=1)))
    assert [cell for cell, _ in failure.value.failures] == ["smollm2-135m/wanda-sp@0.3 seed 0"]
    assert "needs at least" in failure.value.failures[0][1]

    on_ray, _ = load_results([tmp_path / "ray"])  # the two good cells were written by the driver
    assert sorted(r["spec"]["method"] for r in on_ray) == ["flap", "wanda-sp"]
    for method, result in _by_method(local).items():
        _same(_by_method(on_ray)[method], result)
    # A rerun finds the finished cells and runs nothing (no Ray needed for them).
    again = run_grid(specs, tmp_path / "ray", show_progress=False, host=host, executor=make_executor("local"))
    assert [r["path"] for r in again] == [r["path"] for r in sorted(on_ray, key=lambda r: r["spec"]["method"] != "wanda-sp")]


@pytest.mark.real
def test_slurm_executor_through_submitit_debug_cluster(tmp_path, host):
    pytest.importorskip("submitit")
    specs = [_spec("wanda-sp")]
    local = run_grid(specs, tmp_path / "local", show_progress=False, host=host)
    slurm = run_grid(specs, tmp_path / "slurm", show_progress=False, host=host,
                     executor=SlurmExecutor(folder=tmp_path / "submitit", cluster="debug"))
    _same(slurm[0], local[0])
    assert load_results([tmp_path / "slurm"])[0][0]["path"] == slurm[0]["path"]
