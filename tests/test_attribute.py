"""Attribution of a gap between two methods to their component kinds, on tiny float64
models: the factorial plan finds the differing kinds and every combination per seed,
reports (does not crash on) the combinations that cannot run, and the anchored effects
(Moebius inversion) sum to the gap, carry intervals, and are undefined exactly where a
cell they need is missing."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import pytest

from prunebench.harness.attribute import (
    anchored_weights,
    attribution_report,
    attribution_specs,
    differing_kinds,
    swap_overrides,
)
from prunebench.harness.errors import UsageError
from prunebench.harness.grid import run_grid, stored_results
from prunebench.harness.regression import CaseProtocol, case_inputs, case_spec
from prunebench.harness.session import RunSession

PROTOCOL = CaseProtocol(calibration_samples=2, calibration_seqlen=16, eval_samples=4, eval_seqlen=16)
SOURCE = "random-tokens"


def make_spec(method, extra, seed):
    return case_spec("tiny-llama-gqa", method, 0.3, dataclasses.replace(PROTOCOL, seed=seed), overrides=tuple(extra))


def _runner(spec, results_dir, host, show_progress):
    return RunSession(spec, host=host, show_progress=False, inputs=case_inputs).run(results_dir).to_dict()


def _run(plan, folder, host):
    """The plan's runnable cells through the ordinary grid (tiny models and random tokens are
    not names a real run accepts, so the grid's cheap checks are told about them)."""
    import prunebench.harness.data as data
    import prunebench.harness.models as models

    sources = data.list_sources()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "list_sources", lambda: [*sources, SOURCE])
        mp.setattr(models, "check_model_name", lambda name: None)
        return run_grid([c.spec for c in plan.runnable], folder, show_progress=False, host=host, runner=_runner)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv("PRUNEBENCH_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def flap(host, cache_dir, tmp_path_factory):
    """wanda-sp vs flap: four kinds differ; flap's allocation needs flap's importance."""
    plan = attribution_specs(host, "wanda-sp", "flap", make_spec, [0])
    results = _run(plan, tmp_path_factory.mktemp("flap"), host)
    return plan, results, attribution_report(plan, results, resamples=400)


@pytest.fixture(scope="module")
def svd(host, cache_dir, tmp_path_factory):
    """wanda-sp vs svd-llm: attention and FFN differ, and every combination runs."""
    plan = attribution_specs(host, "wanda-sp", "svd-llm", make_spec, [0, 1])
    results = _run(plan, tmp_path_factory.mktemp("svd"), host)
    return plan, results, attribution_report(plan, results, resamples=400)


# ----- the plan ------------------------------------------------------------------------------------
def test_the_plan_finds_the_differing_kinds_and_every_combination_per_seed(flap):
    plan, _, _ = flap
    assert (plan.a, plan.b, plan.sparsity) == ("wanda-sp", "flap", 0.3)
    assert plan.kinds == ["importance", "allocation", "attention", "ffn"]
    assert len(plan.cells) == 2**4 and {c.levels for c in plan.cells} == set(itertools.product((0, 1), repeat=4))


def test_seeds_multiply_the_cells(svd):
    plan, _, _ = svd
    assert plan.kinds == ["attention", "ffn"] and plan.seeds == [0, 1]
    assert len(plan.cells) == 2**2 * 2 == len(plan.runnable)
    assert sorted((c.levels, c.seed) for c in plan.cells) == sorted(itertools.product(itertools.product((0, 1), repeat=2), (0, 1)))
    assert {c.spec.seed for c in plan.cells} == {0, 1}


def test_a_combination_that_cannot_run_is_reported_not_crashed(flap):
    plan, _, _ = flap
    allocation, importance = plan.kinds.index("allocation"), plan.kinds.index("importance")
    bad = [c for c in plan.cells if c.levels[allocation] == 1 and c.levels[importance] == 0]
    assert len(bad) == 4
    for c in bad:
        assert c.skipped.startswith("UsageError") and "flap-al-am" in c.skipped and c.spec is None
        assert "allocation=flap-al-am" in c.overrides
    assert plan.runnable == [c for c in plan.cells if c not in bad]
    assert all(c.spec is not None and c.spec.overrides == c.overrides for c in plan.runnable)


def test_the_cells_take_each_swapped_kind_whole_from_b(host):
    b = host.resolve("flap")
    overrides = swap_overrides(b, ["allocation", "ffn"], (0, 1))
    assert overrides[0] == "ffn=flap"
    assert sorted(overrides[1:]) == sorted(f"ffn.{p}={json.dumps(v)}" for p, v in b.components["ffn"].params.items())
    swapped = host.resolve("wanda-sp", overrides)
    assert swapped.components["ffn"] == b.components["ffn"]
    assert swapped.components["allocation"] == host.resolve("wanda-sp").components["allocation"]
    assert differing_kinds(swapped, b) == ["importance", "allocation", "attention"]


def test_two_recipes_with_the_same_components_have_nothing_to_attribute(host):
    with pytest.raises(UsageError, match="nothing to attribute"):
        attribution_specs(host, "wanda-sp", "wanda-sp", make_spec, [0], probe=False)


# ----- the effects ---------------------------------------------------------------------------------
def _effects(report):
    return {e.name: e for e in report.effects if e.source == SOURCE}


def _log_ppl(result) -> float:
    seqlen = result["spec"]["protocol"]["metrics"]["ppl"]["seqlen"]
    windows = result["metrics"]["pruned"]["ppl_windows"][SOURCE]
    return sum(x / (seqlen - 1) for x in windows) / len(windows)


def test_the_grid_ran_every_runnable_cell_once(svd, flap):
    for plan, results, _ in (svd, flap):
        assert len(results) == len(plan.runnable)
        assert len({r["cell"] for r in results}) == len(results)


def test_two_shards_give_the_unsharded_report(svd, host, tmp_path):
    """Each shard runs every other cell; the summary reads every stored cell in plan order
    (a shard's own results are not the plan's: labels must follow the cells)."""
    import prunebench.harness.data as data
    import prunebench.harness.models as models

    plan, results, report = svd
    specs = [c.spec for c in plan.runnable]
    sources = data.list_sources()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "list_sources", lambda: [*sources, SOURCE])
        mp.setattr(models, "check_model_name", lambda name: None)
        first = run_grid(specs, tmp_path, shard="0/2", show_progress=False, host=host, runner=_runner)
        half = stored_results(specs, tmp_path, host)
        assert [r is None for r in half] == [i % 2 == 1 for i in range(len(specs))]
        assert [r["cell"] for r in half if r is not None] == [r["cell"] for r in first]
        partial = attribution_report(plan, half, resamples=400)
        # Cells alternate by seed, so shard 0/2 holds seed 0 of every cell: a one-seed summary.
        assert partial.seeds == [0] and all(e.value is not None for e in partial.effects)
        run_grid(specs, tmp_path, shard="1/2", show_progress=False, host=host, runner=_runner)
        whole = stored_results(specs, tmp_path, host)
    assert [r["cell"] for r in whole] == [r["cell"] for r in results]
    again = attribution_report(plan, whole, resamples=400)
    assert again.cells.keys() == report.cells.keys() and again.seeds == report.seeds == [0, 1]
    for levels in report.cells:
        assert again.cells[levels][SOURCE] == pytest.approx(report.cells[levels][SOURCE], rel=1e-9)
    with pytest.raises(ValueError, match="align them"):
        attribution_report(plan, first, resamples=10)


def test_anchored_effects_sum_to_the_gap_when_every_cell_ran(svd):
    plan, results, report = svd
    effects = _effects(report)
    gap = effects.pop("total gap (B - A)")
    assert set(effects) == {"attention", "ffn", "attention x ffn"}
    assert sum(e.value for e in effects.values()) == pytest.approx(gap.value, abs=1e-12)
    # the gap is B's mean log-perplexity minus A's, over the seeds
    y = {}
    for cell, result in zip(plan.runnable, results):
        y.setdefault(cell.levels, []).append(_log_ppl(result))
    y = {k: sum(v) / len(v) for k, v in y.items()}
    assert gap.value == pytest.approx(y[(1, 1)] - y[(0, 0)], abs=1e-12)
    assert effects["attention"].value == pytest.approx(y[(1, 0)] - y[(0, 0)], abs=1e-12)
    assert effects["attention x ffn"].value == pytest.approx(y[(1, 1)] - y[(1, 0)] - y[(0, 1)] + y[(0, 0)], abs=1e-12)
    assert effects["ffn"].averaged == pytest.approx((y[(0, 1)] + y[(1, 1)] - y[(0, 0)] - y[(1, 0)]) / 2, abs=1e-12)
    assert effects["attention x ffn"].averaged is None


def test_every_effect_has_an_interval_around_its_value(svd, flap):
    for _, _, report in (svd, flap):
        for e in report.effects:
            if e.value is not None:
                assert e.low <= e.value <= e.high, e
    for e in svd[2].effects:  # every swap changes the model here: real intervals, not points
        assert e.low < e.value < e.high and e.value != 0.0, e


def test_effects_that_need_a_skipped_cell_are_undefined(flap):
    plan, _, report = flap
    skipped = {c.levels for c in plan.cells if c.skipped}
    effects = _effects(report)
    for s, weights in anchored_weights(len(plan.kinds)).items():
        if not any(s):
            continue
        name = " x ".join(k for k, x in zip(plan.kinds, s) if x)
        needs_skipped = any(t in skipped for t in weights)
        assert (effects[name].value is None) == needs_skipped, name
        if needs_skipped:
            assert effects[name].low is None and effects[name].high is None
    assert effects["importance"].value is not None and effects["allocation"].value is None
    assert effects["allocation"].averaged is None  # half the allocation=flap cells are missing
    assert effects["total gap (B - A)"].value is not None


def test_the_cell_table_reports_each_mean_perplexity(svd):
    import math

    plan, results, report = svd
    assert set(report.cells) == {c.levels for c in plan.cells}
    for levels, values in report.cells.items():
        logs = [_log_ppl(r) for c, r in zip(plan.runnable, results) if c.levels == levels]
        assert values[SOURCE] == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-12)


def test_markdown_lists_every_cell_and_marks_the_skipped_ones(flap):
    plan, _, report = flap
    text = report.markdown()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "PPL" not in line and "effect" not in line]
    for levels in itertools.product((0, 1), repeat=4):
        label = plan.label(levels)
        row = next(line for line in rows if line.startswith(f"| {label} |"))
        assert ("skipped (UsageError" in row) == (levels in {c.levels for c in plan.cells if c.skipped})
    assert text.count("skipped (") == 4
    assert "| allocation | - |" in text
    assert plan.label((0, 0, 0, 0)) == "wanda-sp" and plan.label((1, 1, 1, 1)) == "flap"


def test_json_has_the_effects_the_cells_and_the_skipped_combinations(flap):
    plan, _, report = flap
    data = json.loads(report.to_json())
    assert {"effects", "cells", "skipped"} <= set(data)
    assert (data["a"], data["b"], data["kinds"]) == ("wanda-sp", "flap", plan.kinds)
    assert len(data["cells"]) == 12 and len(data["skipped"]) == 4
    assert all("flap-al-am" in s["why"] for s in data["skipped"])
    names = {e["name"] for e in data["effects"]}
    assert len(names) == 2**4 - 1 + 1  # every non-empty subset of kinds, and the total gap


# ----- the algebra ---------------------------------------------------------------------------------
def test_anchored_weights_of_one_kind():
    assert anchored_weights(1) == {(0,): {(0,): 1}, (1,): {(0,): -1, (1,): 1}}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_anchored_weights_invert_a_sum_of_known_effects(k):
    rng = random.Random(k)
    subsets = list(itertools.product((0, 1), repeat=k))
    beta = {s: rng.uniform(-1, 1) for s in subsets}  # beta of the empty set is the baseline y(A)

    def y(t):  # y(T) = sum of the effects of every subset of T
        return sum(b for s, b in beta.items() if all(si <= ti for si, ti in zip(s, t)))

    weights = anchored_weights(k)
    assert set(weights) == set(subsets)
    for s, w in weights.items():
        assert sum(c * y(t) for t, c in w.items()) == pytest.approx(beta[s], abs=1e-12)
        assert len(w) == 2 ** sum(s)
    gap = y(tuple([1] * k)) - y(tuple([0] * k))
    assert sum(beta[s] for s in subsets if any(s)) == pytest.approx(gap, abs=1e-12)
