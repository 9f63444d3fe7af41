"""Noise, intervals and verdicts: what a comparison of pruning results can claim.

A pruned model's perplexity moves with the calibration sample (the seed), and a finite
evaluation text measures it with error. So a cell of a comparison (one recipe at one
sparsity under one protocol) is the set of its runs over calibration seeds, and every
headline number comes with an interval; two cells are compared by a stated test, and a
difference inside the noise is reported as *no significant difference*.

* Units (perplexity): every run of a protocol is evaluated on the same windows, and a run
  records the mean NLL of each window. A cell's statistic is the mean over its seeds of the
  mean over windows (log-perplexity; shown as exp). Its interval, and the test between two
  cells, is a two-level bootstrap: seeds resampled with replacement, then windows resampled
  with replacement (the same windows for every seed and both cells: pairing), ``B`` times
  with a fixed generator, 95% percentile interval. Two cells differ significantly when the
  interval of the paired difference excludes 0. With one seed the interval covers the
  evaluation text only (the calibration noise is not measured) and the verdict says so.
* Standard errors (zero-shot accuracy): lm-eval's per-task standard errors (items as
  independent draws), combined over tasks; over seeds the mean, with the standard error
  sqrt(mean(se^2) + var_seeds / S). Two cells: a two-sided z-test at 5% on the difference
  (unpaired, so conservative: the items are shared in fact).

Each pair is tested at the 5% level on its own (no multiplicity correction; a table of k
methods makes k(k-1)/2 comparisons, so expect about one false call in twenty pairs).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from prunebench.harness.metrics import Measure

BOOTSTRAP = 2000
LEVEL = 0.95
Z = 1.959963984540054  # two-sided 95% normal quantile
SEED = 12345
"""The bootstrap's generator seed: a report is the same every time it is made."""
TEST_UNITS = f"paired two-level bootstrap (seeds, then evaluation windows), {BOOTSTRAP} resamples, 95% percentile interval"
TEST_STDERR = "two-sided z-test at 5% on lm-eval's standard errors (tasks independent; seed variance added)"


@dataclass
class CellStat:
    """One headline measure of one cell over its seeds."""

    key: str
    header: str
    better: str | None
    seeds: list[int]
    values: list[float]
    mean: float  # the cell's value (exp of the mean log for unit-based measures)
    low: float | None = None
    high: float | None = None
    spread: tuple[float, float] | None = None  # min and max over seeds
    units: list[list[float]] | None = None  # per seed, per unit (for paired tests)
    stderr: float | None = None
    display: str = "identity"


@dataclass
class Verdict:
    """Cell A against cell B on one measure: ``better`` / ``worse`` / ``no significant difference``."""

    key: str
    a: str
    b: str
    sparsity: float | None
    verdict: str
    difference: float  # A - B on the test's scale (log-perplexity, or accuracy)
    low: float
    high: float
    test: str
    seeds: int
    units: int | None = None
    note: str = ""


@dataclass
class Cell:
    """All runs of one recipe at one sparsity under one protocol (one per seed)."""

    label: str
    sparsity: float | None
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [int(r["spec"].get("seed", 0)) for r in self.results]

    @property
    def id(self) -> tuple[str, float | None]:
        return self.label, self.sparsity


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def bootstrap_mean(units: torch.Tensor, resamples: int = BOOTSTRAP, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bootstrap replicates of the mean of ``units`` [seeds, windows]: seeds, then windows,
    resampled with replacement (one window draw per replicate, shared by the seeds)."""
    generator = generator or _generator()
    s, w = units.shape
    seed_idx = torch.randint(0, s, (resamples, s), generator=generator)
    win_idx = torch.randint(0, w, (resamples, w), generator=generator)
    picked = units[seed_idx[:, :, None], win_idx[:, None, :]]  # [B, S, W]
    return picked.mean(dim=(1, 2))


def interval(replicates: torch.Tensor) -> tuple[float, float]:
    alpha = (1.0 - LEVEL) / 2
    q = torch.quantile(replicates.to(torch.float64), torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def show(x: float, display: str) -> float:
    return math.exp(x) if display == "exp" else x


def cell_key(result: dict[str, Any]) -> tuple[str, str, float | None]:
    """Runs that differ only by seed share this key: protocol, recipe name, sparsity."""
    return result["spec"].get("protocol_id", "?"), result["recipe"]["name"], result["sparsity"]["target"]


def group_cells(results: list[dict[str, Any]]) -> list[Cell]:
    """The cells of one protocol's results, each with its runs sorted by seed; a seed that
    occurs twice in a cell keeps the last file read."""
    cells: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in results:
        cells[cell_key(r)][int(r["spec"].get("seed", 0))] = r
    out = []
    for (_, name, sparsity), by_seed in cells.items():
        out.append(Cell(name, sparsity, [by_seed[s] for s in sorted(by_seed)]))
    return sorted(out, key=lambda c: (float("inf") if c.sparsity is None else c.sparsity, c.label))


def cell_stats(cell: Cell, measures_of: Any) -> dict[str, CellStat]:
    """Headline measures of a cell over its seeds, with intervals (module docstring).
    ``measures_of(result)`` gives a result's pruned-phase measures."""
    per_key: dict[str, list[tuple[int, Measure]]] = defaultdict(list)
    for seed, result in zip(cell.seeds, cell.results):
        for m in measures_of(result):
            if m.headline and m.value is not None:
                per_key[m.key].append((seed, m))
    out = {}
    for key, found in per_key.items():
        seeds = [s for s, _ in found]
        first = found[0][1]
        values = [m.value for _, m in found]
        stat = CellStat(key, first.header, first.better, seeds, values, mean=values[0], display=first.display)
        if all(m.units for _, m in found) and len({len(m.units) for _, m in found}) == 1:
            units = torch.tensor([list(m.units) for _, m in found], dtype=torch.float64)
            stat.units = units.tolist()
            stat.mean = show(float(units.mean()), first.display)
            low, high = interval(bootstrap_mean(units))
            stat.low, stat.high = show(low, first.display), show(high, first.display)
        else:
            stat.mean = sum(values) / len(values)
            errors = [m.stderr for _, m in found]
            if all(e is not None for e in errors):
                var_seeds = (sum((v - stat.mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                se = math.sqrt(sum(e * e for e in errors) / len(errors) + var_seeds / len(values))
                stat.stderr = se
                stat.low, stat.high = stat.mean - Z * se, stat.mean + Z * se
        if len(values) > 1:
            stat.spread = (min(values), max(values))
        out[key] = stat
    return out


def compare(a: CellStat, b: CellStat, label_a: str, label_b: str, sparsity: float | None = None) -> Verdict | None:
    """A against B on one measure (module docstring); None when the test cannot be made."""
    if a.units is not None and b.units is not None:
        common = sorted(set(a.seeds) & set(b.seeds))
        if not common or len(a.units[0]) != len(b.units[0]):
            return None
        ua = torch.tensor([a.units[a.seeds.index(s)] for s in common], dtype=torch.float64)
        ub = torch.tensor([b.units[b.seeds.index(s)] for s in common], dtype=torch.float64)
        diff = ua - ub
        low, high = interval(bootstrap_mean(diff))
        d = float(diff.mean())
        note = "" if len(common) > 1 else "1 seed: the interval covers the evaluation text only"
        return Verdict(a.key, label_a, label_b, sparsity, _word(low, high, a.better), d, low, high, TEST_UNITS,
                       len(common), int(ua.shape[1]), note)
    if a.stderr is not None and b.stderr is not None:
        d = a.mean - b.mean
        se = math.sqrt(a.stderr**2 + b.stderr**2)
        low, high = d - Z * se, d + Z * se
        return Verdict(a.key, label_a, label_b, sparsity, _word(low, high, a.better), d, low, high, TEST_STDERR,
                       min(len(a.seeds), len(b.seeds)))
    return None


NEGLIGIBLE = 1e-3
"""A difference whose whole interval lies within +-1e-3 (0.1% perplexity in log units, 0.1
accuracy points) is no difference: two runs that took the same pruning choices differ by
float rounding only (~1e-7), and a bootstrap of such differences excludes zero without
meaning anything."""


def _word(low: float, high: float, better: str | None) -> str:
    """The verdict of an interval of A - B: A better when the interval lies on the good side
    (and is not entirely within ``NEGLIGIBLE`` of zero)."""
    if low <= 0.0 <= high or better is None or max(abs(low), abs(high)) < NEGLIGIBLE:
        return "no significant difference"
    a_lower = high < 0.0
    good = a_lower if better == "lower" else not a_lower
    return "better" if good else "worse"


Stats = dict[tuple[str, "float | None"], dict[str, CellStat]]


def pairwise(cells: list[Cell], stats: Stats) -> list[Verdict]:
    """Every pair of cells at the same sparsity, on every headline measure they share."""
    out = []
    by_sparsity: dict[float | None, list[Cell]] = defaultdict(list)
    for c in cells:
        by_sparsity[c.sparsity].append(c)
    for group in by_sparsity.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                for key, stat in stats[a.id].items():
                    if key in stats[b.id]:
                        v = compare(stat, stats[b.id][key], a.label, b.label, a.sparsity)
                        if v is not None:
                            out.append(v)
    return out


def ranks(cells: list[Cell], stats: Stats, verdicts: list[Verdict], key: str) -> dict[tuple[str, float | None], str]:
    """Rank of each cell on ``key`` within its sparsity: 1 + the number of cells significantly
    better than it. Cells that share a rank are within each other's noise (or untested):
    shown as ``=k`` when another cell of the sparsity has the same rank."""
    beaten: dict[tuple[str, float | None], int] = defaultdict(int)
    for v in verdicts:
        if v.key != key:
            continue
        if v.verdict == "better":
            beaten[(v.b, v.sparsity)] += 1
        elif v.verdict == "worse":
            beaten[(v.a, v.sparsity)] += 1
    out: dict[tuple[str, float | None], str] = {}
    by_sparsity: dict[float | None, list[Cell]] = defaultdict(list)
    for c in cells:
        if key in stats[c.id]:
            by_sparsity[c.sparsity].append(c)
    for group in by_sparsity.values():
        rank = {c.id: 1 + beaten[c.id] for c in group}
        for c in group:
            shared = sum(1 for r in rank.values() if r == rank[c.id]) > 1
            out[c.id] = f"={rank[c.id]}" if shared else str(rank[c.id])
    return out
