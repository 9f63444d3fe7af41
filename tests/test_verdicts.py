"""Noise and verdicts: the two-level bootstrap is exact on constants and reproducible; a
cell's statistic is the mean over seeds and windows with a spread and an interval; a gap
well outside the noise is a verdict in the right direction, one inside it is not; the
z-test on standard errors; one-seed verdicts say what they cover; ranks count only
significant wins and never mix sparsities."""

from __future__ import annotations

import math
import random

import pytest
import torch

from prunebench.harness.metrics import Measure
from prunebench.harness.verdicts import (
    TEST_STDERR,
    TEST_UNITS,
    Cell,
    Z,
    bootstrap_mean,
    cell_stats,
    compare,
    group_cells,
    interval,
    pairwise,
    ranks,
)

KEY = "ppl:wiki"


def _units(level: float, seed: int, noise: float = 0.05, n: int = 24, pattern: str = "") -> list[float]:
    """Per-window mean NLLs around ``level``: a window pattern shared by every cell (the
    windows are the same text), plus noise of size ``noise`` of the cell's own (``pattern``)
    per seed and window."""
    shared = random.Random(1234)
    own = random.Random(f"{pattern}/{seed}")
    return [level + 0.5 * shared.uniform(-1, 1) + noise * own.uniform(-1, 1) for _ in range(n)]


def _result(label: str, sparsity: float | None, seed: int, measure: Measure) -> dict:
    return {"spec": {"seed": seed, "protocol_id": "p"}, "recipe": {"name": label}, "sparsity": {"target": sparsity},
            "measures": [measure]}


def _ppl_cell(label: str, level: float, seeds=(0, 1, 2), sparsity: float | None = 0.3, better="lower", noise=0.05,
              pattern: str | None = None) -> Cell:
    results = []
    for s in seeds:
        units = tuple(_units(level, s, noise, pattern=label if pattern is None else pattern))
        value = math.exp(sum(units) / len(units))
        results.append(_result(label, sparsity, s, Measure(KEY, "PPL", value, better=better, units=units, display="exp",
                                                          headline=True)))
    return Cell(label, sparsity, results)


def _measures(result: dict) -> list[Measure]:
    return result["measures"]


def _stat(cell: Cell):
    return cell_stats(cell, _measures)[KEY]


# ----- the bootstrap ------------------------------------------------------------------------------
def test_the_bootstrap_of_a_constant_is_that_constant():
    replicates = bootstrap_mean(torch.full((3, 10), 2.5, dtype=torch.float64), resamples=500)
    assert replicates.shape == (500,) and torch.all(replicates == 2.5)
    assert interval(replicates) == (2.5, 2.5)


def test_intervals_are_the_same_every_time():
    units = torch.tensor([_units(1.0, s, noise=0.3, pattern="x") for s in range(3)], dtype=torch.float64)
    first = interval(bootstrap_mean(units))
    assert interval(bootstrap_mean(units.clone())) == first
    assert first[0] < float(units.mean()) < first[1]
    other = interval(bootstrap_mean(units, generator=torch.Generator().manual_seed(7)))
    assert other != first  # the fixed generator is what makes them equal


def test_the_bootstrap_resamples_seeds_as_well_as_windows():
    # every window identical within a seed: only the seed level can vary the replicates
    units = torch.tensor([[1.0] * 8, [2.0] * 8, [3.0] * 8], dtype=torch.float64)
    replicates = bootstrap_mean(units, resamples=400)
    assert replicates.min() < 2.0 < replicates.max()
    thirds = replicates * 3  # a mean of three drawn seed levels out of 1, 2, 3
    assert torch.allclose(thirds, thirds.round()) and thirds.min() >= 3 and thirds.max() <= 9


# ----- a cell over seeds --------------------------------------------------------------------------
def test_a_cell_over_three_seeds_has_a_mean_a_spread_and_an_interval():
    cell = _ppl_cell("m", 3.0, noise=0.1)
    stat = _stat(cell)
    units = torch.tensor(stat.units, dtype=torch.float64)
    assert stat.seeds == [0, 1, 2] and units.shape == (3, 24)
    assert stat.mean == pytest.approx(math.exp(float(units.mean())), rel=1e-12)  # exp of the mean log-unit
    values = [r["measures"][0].value for r in cell.results]
    assert stat.values == values and stat.spread == (min(values), max(values))
    assert stat.low < stat.mean < stat.high
    assert math.exp(2.8) < stat.low and stat.high < math.exp(3.2)
    assert stat.stderr is None and stat.display == "exp" and stat.better == "lower"


def test_one_seed_has_no_spread():
    stat = _stat(_ppl_cell("m", 3.0, seeds=(0,)))
    assert stat.spread is None and stat.low < stat.mean < stat.high


def test_measures_that_are_not_headline_or_have_no_value_get_no_statistics():
    result = _result("m", 0.3, 0, Measure("kv", "KV x", 0.5, better="lower"))
    result["measures"].append(Measure("x", "x", None, better="lower", headline=True))
    assert cell_stats(Cell("m", 0.3, [result]), _measures) == {}


def test_standard_errors_combine_over_seeds():
    results = [_result("m", 0.3, s, Measure("acc", "acc", v, better="higher", stderr=se, headline=True))
               for s, (v, se) in enumerate([(0.40, 0.02), (0.44, 0.03), (0.42, 0.01)])]
    stat = cell_stats(Cell("m", 0.3, results), _measures)["acc"]
    var_seeds = sum((v - 0.42) ** 2 for v in (0.40, 0.44, 0.42)) / 2
    se = math.sqrt((0.02**2 + 0.03**2 + 0.01**2) / 3 + var_seeds / 3)
    assert stat.mean == pytest.approx(0.42) and stat.stderr == pytest.approx(se)
    assert (stat.low, stat.high) == (pytest.approx(0.42 - Z * se), pytest.approx(0.42 + Z * se))
    assert stat.units is None and stat.spread == (0.40, 0.44)


# ----- comparing two cells ------------------------------------------------------------------------
def test_a_gap_well_outside_the_noise_is_better_or_worse_in_the_right_direction():
    low, high = _stat(_ppl_cell("low", 3.0)), _stat(_ppl_cell("high", 3.5))
    v = compare(low, high, "low", "high", 0.3)
    assert v.verdict == "better" and v.difference == pytest.approx(-0.5, abs=0.03)
    assert v.high < 0 and v.low < v.difference < v.high
    assert v.test == TEST_UNITS and v.seeds == 3 and v.units == 24 and v.note == "" and v.sparsity == 0.3
    assert compare(high, low, "high", "low").verdict == "worse"


def test_for_a_higher_is_better_measure_the_directions_swap():
    low = _stat(_ppl_cell("low", 0.3, better="higher"))
    high = _stat(_ppl_cell("high", 0.8, better="higher"))
    assert compare(low, high, "low", "high").verdict == "worse"
    assert compare(high, low, "high", "low").verdict == "better"


def test_identical_cells_are_no_significant_difference():
    a, b = _stat(_ppl_cell("a", 3.0, pattern="same")), _stat(_ppl_cell("b", 3.0, pattern="same"))
    v = compare(a, b, "a", "b")
    assert v.verdict == "no significant difference" and v.difference == 0.0 and v.low == 0.0 == v.high


def test_a_float_rounding_sized_gap_is_no_significant_difference_even_if_its_interval_excludes_zero():
    """Two runs that took the same choices differ by rounding (~1e-7 in log-PPL): no verdict."""
    a = _stat(_ppl_cell("a", 3.0, pattern="same"))
    b = _stat(_ppl_cell("b", 3.0, pattern="same"))
    b.units = [[u + 1e-7 for u in row] for row in b.units]
    v = compare(a, b, "a", "b")
    assert v.high < 0.0 and v.verdict == "no significant difference"
    b.units = [[u + 0.01 for u in row] for row in b.units]  # 1%: a real, consistent gap
    assert compare(a, b, "a", "b").verdict == "better"


def test_a_gap_inside_the_seed_noise_is_no_significant_difference():
    a, b = _stat(_ppl_cell("a", 3.0, noise=0.5)), _stat(_ppl_cell("b", 3.02, noise=0.5))
    v = compare(a, b, "a", "b")
    assert v.verdict == "no significant difference" and v.low < 0.0 < v.high


def test_a_measure_without_a_direction_gets_no_verdict():
    a, b = _stat(_ppl_cell("a", 3.0, better=None)), _stat(_ppl_cell("b", 4.0, better=None))
    assert compare(a, b, "a", "b").verdict == "no significant difference"


def test_cells_without_a_common_seed_or_with_other_windows_are_not_compared():
    assert compare(_stat(_ppl_cell("a", 3.0, seeds=(0,))), _stat(_ppl_cell("b", 4.0, seeds=(1,))), "a", "b") is None
    short = _ppl_cell("b", 4.0)
    for r in short.results:
        m = r["measures"][0]
        r["measures"] = [Measure(m.key, m.header, m.value, m.better, m.units[:10], m.display, headline=True)]
    assert compare(_stat(_ppl_cell("a", 3.0)), _stat(short), "a", "b") is None


def test_standard_errors_are_compared_by_a_z_test():
    def cell(label, value, se):
        return Cell(label, 0.3, [_result(label, 0.3, 0, Measure("acc", "acc", value, better="higher", stderr=se,
                                                                headline=True))])

    a = cell_stats(cell("a", 0.60, 0.02), _measures)["acc"]
    b = cell_stats(cell("b", 0.45, 0.02), _measures)["acc"]
    v = compare(a, b, "a", "b")
    se = math.sqrt(0.02**2 + 0.02**2)
    assert v.test == TEST_STDERR and v.units is None
    assert v.difference == pytest.approx(0.15) and (v.low, v.high) == (pytest.approx(0.15 - Z * se), pytest.approx(0.15 + Z * se))
    assert v.verdict == "better" and compare(b, a, "b", "a").verdict == "worse"
    close = cell_stats(cell("c", 0.47, 0.02), _measures)["acc"]
    assert compare(close, b, "c", "b").verdict == "no significant difference"  # 0.02 < 1.96 * 0.028


def test_one_seed_verdicts_say_the_interval_covers_the_evaluation_text_only():
    v = compare(_stat(_ppl_cell("a", 3.0, seeds=(0,))), _stat(_ppl_cell("b", 4.0, seeds=(0,))), "a", "b")
    assert v.seeds == 1 and "evaluation text only" in v.note
    v3 = compare(_stat(_ppl_cell("a", 3.0)), _stat(_ppl_cell("b", 4.0)), "a", "b")
    assert v3.note == ""


def test_only_the_common_seeds_are_paired():
    v = compare(_stat(_ppl_cell("a", 3.0, seeds=(0, 1, 2))), _stat(_ppl_cell("b", 4.0, seeds=(1, 2, 5))), "a", "b")
    assert v.seeds == 2 and v.verdict == "better"


# ----- grouping and ranks -------------------------------------------------------------------------
def test_runs_group_into_cells_by_recipe_and_sparsity_with_seeds_in_order():
    runs = [*reversed(_ppl_cell("a", 3.0).results), *_ppl_cell("a", 3.0, sparsity=0.2).results,
            *_ppl_cell("b", 3.0, seeds=(4, 1)).results]
    cells = group_cells(runs)
    assert [(c.label, c.sparsity, c.seeds) for c in cells] == [("a", 0.2, [0, 1, 2]), ("a", 0.3, [0, 1, 2]), ("b", 0.3, [1, 4])]


def _ranked(cells: list[Cell]) -> dict:
    stats = {c.id: cell_stats(c, _measures) for c in cells}
    return ranks(cells, stats, pairwise(cells, stats), KEY)


def test_ranks_count_only_significant_wins_per_sparsity():
    cells = [
        _ppl_cell("good", 3.0, sparsity=0.2), _ppl_cell("bad", 3.6, sparsity=0.2),
        # at 0.3 the same two recipes are indistinguishable, and a third is clearly worse
        _ppl_cell("good", 3.3, sparsity=0.3), _ppl_cell("bad", 3.3, sparsity=0.3), _ppl_cell("worst", 4.5, sparsity=0.3),
    ]
    r = _ranked(cells)
    assert r[("good", 0.2)] == "1" and r[("bad", 0.2)] == "2"
    assert r[("good", 0.3)] == "=1" and r[("bad", 0.3)] == "=1" and r[("worst", 0.3)] == "3"


def test_cells_within_each_others_noise_share_the_first_rank():
    r = _ranked([_ppl_cell(n, 3.0 + 0.01 * i, noise=0.5) for i, n in enumerate("xyz")])
    assert set(r.values()) == {"=1"}


def test_pairwise_compares_only_cells_of_one_sparsity():
    cells = [_ppl_cell("a", 3.0, sparsity=0.2), _ppl_cell("b", 3.5, sparsity=0.3), _ppl_cell("c", 3.2, sparsity=0.3)]
    stats = {c.id: cell_stats(c, _measures) for c in cells}
    verdicts = pairwise(cells, stats)
    assert [(v.a, v.b, v.sparsity) for v in verdicts] == [("b", "c", 0.3)]
