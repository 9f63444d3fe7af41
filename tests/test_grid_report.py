"""Grids resume without redoing finished cells and shard cleanly; reports never mix
protocols and render the markdown table and the three plots."""

from __future__ import annotations

import copy
import json

import pytest

from prunebench.harness.api import RunSpec, protocol_id, protocol_of, result_path
from prunebench.harness.errors import UsageError
from prunebench.harness.grid import run_grid
from prunebench.harness.report import group_by_protocol, markdown, plots, rows
from prunebench.harness.results import TOP_LEVEL_KEYS, write_result


def _fake_result(spec: RunSpec, ppl: float) -> dict:
    profile = spec.resolved_profile()
    protocol = protocol_of(spec, profile)
    return {
        "schema": 1,
        "spec": {"model": spec.model, "method": spec.method, "protocol": protocol, "protocol_id": protocol_id(protocol)},
        "recipe": {"name": spec.method, "method": spec.method, "components": {}},
        "sparsity": {"target": spec.sparsity, "achieved": spec.sparsity + 0.001},
        "params": {"dense": {"decoder": 100}, "pruned": {"decoder": 70}},
        "metrics": {
            "dense": {"ppl": {"wiki-offline": 20.0}, "zeroshot": {"scores": {"arc_easy": 0.5}, "average": 0.5}},
            "pruned": {"ppl": {"wiki-offline": ppl}, "zeroshot": {"scores": {"arc_easy": 0.4}, "average": 0.4}},
        },
        "timings": {"stages_s": {"prune": 12.0},
                    "inference": {"ratios": {"prefill_latency_ratio": 0.8, "prefill_speedup": 1.25, "decode_speedup": 1.1}}},
        "memory": {"peak_rss_mb": 1000.0},
        "pruning": {},
        "environment": {},
    }


class FakeRunner:
    """Stands in for run_experiment: records calls, writes a result like the real one."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail_on = fail_on

    def __call__(self, spec, results_dir, host, show_progress):
        if spec.method == self.fail_on:
            raise KeyboardInterrupt  # an interruption in the middle of the grid
        self.calls.append((spec.method, spec.sparsity))
        result = _fake_result(spec, 30.0 + spec.sparsity)
        name = host.resolve(spec.method, spec.overrides).name
        path = result_path(results_dir, spec, name, result["spec"]["protocol_id"])
        write_result(path, result)
        return result


def _specs(methods=("wanda-sp",), sparsities=(0.2, 0.3)):
    return [RunSpec(method=m, sparsity=s, profile="ci", zeroshot=False, timing=False) for m in methods for s in sparsities]


def test_interrupted_grid_resumes_without_redoing_finished_runs(tmp_path, host):
    specs = _specs(methods=("wanda-sp", "wanda-sp"), sparsities=(0.2,))
    specs[1].overrides = ["ffn=keep"]
    first = FakeRunner()
    run_grid(specs[:1], tmp_path, host=host, runner=first)
    assert first.calls == [("wanda-sp", 0.2)]
    second = FakeRunner()
    results = run_grid(specs, tmp_path, host=host, runner=second)
    assert second.calls == [("wanda-sp", 0.2)] and len(results) == 2  # only the new cell ran
    third = FakeRunner()
    run_grid(specs, tmp_path, host=host, runner=third)
    assert third.calls == []


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
    assert mine.calls == [("wanda-sp", 0.2)] and other.calls == [("wanda-sp", 0.3)]
    assert [r["sparsity"]["target"] for r in results] == [0.2, 0.3] and "path" in results[1]


def test_shards_split_a_grid_and_cover_it_once(tmp_path, host):
    specs = _specs(sparsities=(0.1, 0.2, 0.3, 0.4))
    a, b = FakeRunner(), FakeRunner()
    run_grid(specs, tmp_path, shard="0/2", host=host, runner=a)
    run_grid(specs, tmp_path, shard="1/2", host=host, runner=b)
    assert sorted(a.calls + b.calls) == [("wanda-sp", s) for s in (0.1, 0.2, 0.3, 0.4)]
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


def test_mixed_protocols_are_grouped_visibly_never_in_one_table():
    a = _fake_result(RunSpec(method="wanda-sp", sparsity=0.2, profile="ci"), 30.0)
    b = _fake_result(RunSpec(method="wanda-sp", sparsity=0.2, profile="offline"), 25.0)
    groups = group_by_protocol([a, b])
    assert len(groups) == 2
    text = markdown([a, b])
    assert text.count("Protocol `") == 2 and "profile ci" in text and "profile offline" in text


def test_rows_follow_table_one_dense_first(tmp_path):
    results = [_fake_result(RunSpec(method="wanda-sp", sparsity=s, profile="ci"), 30.0 + s) for s in (0.3, 0.2)]
    header, body = rows(results)
    assert header[:3] == ["method", "sparsity", "achieved"] and "avg acc" in header
    assert [r[0] for r in body] == ["dense", "wanda-sp", "wanda-sp"] and [r[1] for r in body] == [0.0, 0.2, 0.3]


def test_plots_are_written_as_png(tmp_path):
    results = [_fake_result(RunSpec(method=m, sparsity=s, profile="ci"), 30.0 + s) for m in ("a", "b") for s in (0.2, 0.3)]
    for r, m in zip(results, ("a", "a", "b", "b")):
        r["recipe"]["name"] = m
    written = plots(results, tmp_path)
    assert len(written) == 3
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_writer_refuses_incomplete_results(tmp_path):
    result = _fake_result(RunSpec(profile="ci"), 30.0)
    broken = copy.deepcopy(result)
    del broken["metrics"]
    with pytest.raises(ValueError, match="metrics"):
        write_result(tmp_path / "r.json", broken)
    assert not list(tmp_path.iterdir())
    write_result(tmp_path / "r.json", result)
    assert set(json.loads((tmp_path / "r.json").read_text())) == set(TOP_LEVEL_KEYS)


def test_cost_table_ratios_to_the_reference_method():
    from prunebench.harness.report import cost_rows

    results = []
    for method, seconds in (("slicegpt", 40.0), ("wanda-sp", 10.0), ("intraslice", 100.0)):
        r = _fake_result(RunSpec(model="smollm2-135m", method=method, sparsity=0.3, profile="ci"), 30.0)
        r["timings"]["stages_s"] = {"prune": seconds, "prune.importance": 1.0, "prune.layer_loop": seconds - 1}
        r["memory"]["peak_rss_after_prune_mb"] = 2048.0
        results.append(r)
    header, body = cost_rows(results, reference="slicegpt")
    ratio = {row[0]: row[header.index("x slicegpt")] for row in body}
    assert ratio == {"slicegpt": 1.0, "wanda-sp": 0.25, "intraslice": 2.5}
    assert all(row[header.index("peak RSS GiB")] == 2.0 for row in body)
    header, body = cost_rows(results, reference="flap")  # no reference run: no ratios, still the times
    assert all(row[header.index("x flap")] is None for row in body)


def test_sweep_table_orders_by_the_swept_field_across_protocols(tmp_path):
    from prunebench.harness.report import sweep_markdown, sweep_plot, sweep_rows

    results = []
    for samples, ppl in ((32, 40.0), (16, 50.0), (64, 35.0)):
        spec = RunSpec(model="smollm2-135m", method="intraslice", sparsity=0.3, profile="ci",
                       profile_overrides={"calibration_samples": samples})
        results.append(_fake_result(spec, ppl))
    assert len({r["spec"]["protocol_id"] for r in results}) == 3  # one protocol per calibration size
    key = "spec.protocol.profile.calibration_samples"
    header, body = sweep_rows(results, key)
    assert [row[header.index("calibration_samples")] for row in body] == [16, 32, 64]
    assert [row[header.index("PPL wiki-offline")] for row in body] == [50.0, 40.0, 35.0]
    no_field = _fake_result(RunSpec(model="smollm2-135m", method="wanda-sp", sparsity=0.3, profile="ci"), 9.0)
    no_field["spec"]["protocol"]["profile"].pop("calibration_samples")
    assert "1 result(s) without" in sweep_markdown([*results, no_field], key)
    with pytest.raises(KeyError, match="lambda_b"):
        sweep_rows(results, "recipe.components.allocation.params.lambda_b")
    assert sweep_plot(results, key, tmp_path / "plots" / "sweep.png").stat().st_size > 0
