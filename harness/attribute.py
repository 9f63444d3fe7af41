"""Which component accounts for a gap between two methods: a factorial grid over components.

Two recipes A and B differ in some component kinds (importance, allocation, attention,
FFN, transform). ``prunebench attribute --methods A,B --sparsity s`` runs every recipe
that takes each differing kind from A or from B (2^k cells, each built from A with
``--set`` swaps, so each is an ordinary grid cell: the same store, resume and executors
as ``compare``), per calibration seed, and decomposes the perplexity gap:

* anchored effects (from A): with y(x) the cell's log-perplexity for the choice vector
  x in {A, B}^k, beta_S = sum over T subset of S of (-1)^(|S|-|T|) y(B on T). The main
  effect of a kind is what swapping that kind alone into A changes; the interactions are
  what pairs (triples, ...) add beyond their parts; all of them sum to the gap
  y(B) - y(A) exactly;
* averaged main effects (Yates): mean of y over the cells that take the kind from B
  minus the mean over those that take it from A;
* noise: every effect is a fixed linear combination of cell log-perplexities measured on
  the same windows and seeds, so the two-level bootstrap of ``harness.verdicts``
  (seeds, then windows, resampled jointly for all cells) gives each a 95% interval.

A combination that cannot run (e.g. an allocation that needs importance scores with an
importance of ``none``) is found by a dry run on a tiny random model before anything
real runs, reported, and left out; effects that need it are then not defined.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prunebench.harness.contracts import COMPONENT_KINDS, Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.verdicts import interval, show

BOOTSTRAP = 2000


@dataclass
class FactorCell:
    """One combination: ``levels[i]`` is 0 (A's component) or 1 (B's) for ``kinds[i]``."""

    levels: tuple[int, ...]
    overrides: list[str]
    seed: int
    spec: Any = None
    skipped: str | None = None


@dataclass
class AttributionPlan:
    a: str
    b: str
    sparsity: float
    kinds: list[str]
    seeds: list[int]
    cells: list[FactorCell] = field(default_factory=list)

    @property
    def runnable(self) -> list[FactorCell]:
        return [c for c in self.cells if c.skipped is None]

    def label(self, levels: tuple[int, ...]) -> str:
        if not any(levels):
            return self.a
        if all(levels):
            return self.b
        return f"{self.a} + " + ", ".join(f"{k} from {self.b}" for k, x in zip(self.kinds, levels) if x)


def differing_kinds(a: Recipe, b: Recipe) -> list[str]:
    """Kinds whose component (name or parameters) differs between two resolved recipes."""
    return [k for k in COMPONENT_KINDS if a.components[k].name != b.components[k].name
            or a.components[k].params != b.components[k].params]


def swap_overrides(b: Recipe, kinds: list[str], levels: tuple[int, ...]) -> list[str]:
    """``--set`` items that take the kinds at level 1 from B (component and every parameter)."""
    out = []
    for kind, level in zip(kinds, levels):
        if level:
            ref = b.components[kind]
            out.append(f"{kind}={ref.name}")
            out.extend(f"{kind}.{p}={json.dumps(v)}" for p, v in sorted(ref.params.items()))
    return out


def dry_run(host: PluginHost, method: str, overrides: list[str], sparsity: float) -> str | None:
    """Prune a tiny random model with this combination; None when it runs, else the error."""
    from prunebench.harness.regression import CaseProtocol, run_case

    try:
        run_case("tiny-llama-gqa", method, sparsity, CaseProtocol(calibration_samples=2, calibration_seqlen=16,
                                                                   eval_samples=1, eval_seqlen=16, dtype="float32"),
                 host=host, overrides=tuple(overrides))
    except Exception as exc:  # any failure of the combination is what is reported
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def attribution_specs(host: PluginHost, a: str, b: str, make_spec: Callable[[str, list[str], int], Any],
                      seeds: list[int], sparsity: float | None = None, probe: bool = True) -> AttributionPlan:
    """The factorial cells of A vs B (every seed), each checked by a dry run."""
    ra, rb = host.resolve(a), host.resolve(b)
    kinds = differing_kinds(ra, rb)
    if not kinds:
        raise UsageError(f"{a} and {b} use the same components and parameters: nothing to attribute")
    spec0 = make_spec(a, [], seeds[0])
    target = spec0.sparsity if sparsity is None else sparsity
    plan = AttributionPlan(host.recipe(a).name, host.recipe(b).name, float(target), kinds, list(seeds))
    for levels in itertools.product((0, 1), repeat=len(kinds)):
        overrides = swap_overrides(rb, kinds, levels)
        why = dry_run(host, a, overrides, float(target)) if probe else None
        for seed in seeds:
            cell = FactorCell(levels, overrides, seed, skipped=why)
            if why is None:
                cell.spec = make_spec(a, overrides, seed)
            plan.cells.append(cell)
    return plan


# ----- effects -------------------------------------------------------------------------------------
def _units(result: dict[str, Any], source: str) -> list[float]:
    seqlen = result["spec"]["protocol"]["metrics"]["ppl"]["seqlen"]
    return [x / (seqlen - 1) for x in result["metrics"]["pruned"]["ppl_windows"][source]]


def anchored_weights(k: int) -> dict[tuple[int, ...], dict[tuple[int, ...], int]]:
    """beta_S = sum over T subset of S of (-1)^(|S|-|T|) y(1_T), as {S: {T: coefficient}}."""
    out = {}
    for s in itertools.product((0, 1), repeat=k):
        members = [i for i, x in enumerate(s) if x]
        weights = {}
        for r in range(len(members) + 1):
            for sub in itertools.combinations(members, r):
                t = tuple(1 if i in sub else 0 for i in range(k))
                weights[t] = (-1) ** (len(members) - r)
        out[s] = weights
    return out


@dataclass
class Effect:
    name: str
    source: str
    value: float | None  # on log-perplexity
    low: float | None = None
    high: float | None = None
    averaged: float | None = None  # Yates main effect (main effects only)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class AttributionReport:
    plan: AttributionPlan
    cells: dict[tuple[int, ...], dict[str, float]]  # levels -> source -> mean ppl over seeds
    effects: list[Effect]
    sources: list[str]
    seeds: list[int]

    def _name(self, s: tuple[int, ...]) -> str:
        return " x ".join(k for k, x in zip(self.plan.kinds, s) if x)

    def markdown(self) -> str:
        p = self.plan
        lines = [f"Attribution of the gap {p.a} -> {p.b} at sparsity {p.sparsity:g} "
                 f"(differing kinds: {', '.join(p.kinds)}; seeds {', '.join(map(str, self.seeds))})", ""]
        lines.append("| cell | " + " | ".join(f"PPL {s}" for s in self.sources) + " |")
        lines.append("|---|" + "---|" * len(self.sources))
        for levels in itertools.product((0, 1), repeat=len(p.kinds)):
            values = self.cells.get(levels)
            label = p.label(levels)
            if values is None:
                why = next((c.skipped for c in p.cells if c.levels == levels and c.skipped), "no result")
                lines.append(f"| {label} | " + " | ".join(f"skipped ({why})" for _ in self.sources) + " |")
            else:
                lines.append(f"| {label} | " + " | ".join(f"{values[s]:.2f}" for s in self.sources) + " |")
        lines += ["", "Effects on perplexity as ratios (x1.05 = 5% higher perplexity), 95% bootstrap intervals; "
                  "anchored at " + p.a + "; the rows sum to the gap.", ""]
        lines.append("| effect | " + " | ".join(f"{s} (anchored)" for s in self.sources) + " | "
                     + " | ".join(f"{s} (averaged)" for s in self.sources) + " |")
        lines.append("|---|" + "---|" * (2 * len(self.sources)))
        names = list(dict.fromkeys(e.name for e in self.effects))
        for name in names:
            row = []
            for s in self.sources:
                e = next(x for x in self.effects if x.name == name and x.source == s)
                row.append(_ratio(e.value, e.low, e.high))
            for s in self.sources:
                e = next(x for x in self.effects if x.name == name and x.source == s)
                row.append("-" if e.averaged is None else f"x{show(e.averaged, 'exp'):.3f}")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({
            "a": self.plan.a, "b": self.plan.b, "sparsity": self.plan.sparsity, "kinds": self.plan.kinds, "seeds": self.seeds,
            "cells": [{"levels": list(k), "label": self.plan.label(k), "ppl": v} for k, v in self.cells.items()],
            "skipped": [{"levels": list(c.levels), "overrides": c.overrides, "why": c.skipped}
                        for c in self.plan.cells if c.skipped and c.seed == self.plan.seeds[0]],
            "effects": [e.to_dict() for e in self.effects],
            "scale": "log-perplexity; exp(value) is the perplexity ratio",
        }, indent=1)


def _ratio(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "-"
    text = f"x{show(value, 'exp'):.3f}"
    if low is not None and high is not None:
        text += f" [{show(low, 'exp'):.3f}, {show(high, 'exp'):.3f}]"
    return text


def attribution_report(plan: AttributionPlan, results: list[dict[str, Any] | None], resamples: int = BOOTSTRAP) -> AttributionReport:
    """Effects of each kind and interaction from the cells' results (module docstring)."""
    k = len(plan.kinds)
    found: dict[tuple[int, ...], dict[int, dict[str, Any]]] = {}
    # ``results`` are aligned with plan.runnable (``grid.stored_results``); None: not run yet.
    if len(results) != len(plan.runnable):
        raise ValueError(f"{len(results)} results for {len(plan.runnable)} runnable cells: align them with plan.runnable")
    for cell, result in zip(plan.runnable, results):
        if result is not None:
            found.setdefault(cell.levels, {})[cell.seed] = result
    sources = sorted({s for r in results if r is not None for s in (r["metrics"]["pruned"].get("ppl") or {})})
    seeds = [s for s in plan.seeds if all(s in by_seed for by_seed in found.values())]
    cells_ppl = {levels: {src: show(sum(sum(_units(by_seed[s], src)) / len(_units(by_seed[s], src)) for s in seeds)
                                     / len(seeds), "exp") for src in sources}
                 for levels, by_seed in found.items() if seeds}
    effects: list[Effect] = []
    weights = anchored_weights(k)
    generator = torch.Generator().manual_seed(12345)
    for src in sources:
        units = {levels: torch.tensor([_units(by_seed[s], src) for s in seeds], dtype=torch.float64)
                 for levels, by_seed in found.items()}
        if not units:
            continue
        n_seeds, n_windows = next(iter(units.values())).shape
        seed_idx = torch.randint(0, n_seeds, (resamples, n_seeds), generator=generator)
        win_idx = torch.randint(0, n_windows, (resamples, n_windows), generator=generator)
        boot = {lv: u[seed_idx[:, :, None], win_idx[:, None, :]].mean(dim=(1, 2)) for lv, u in units.items()}
        point = {lv: float(u.mean()) for lv, u in units.items()}
        for s, w in weights.items():
            if not any(s):
                continue
            name = " x ".join(kd for kd, x in zip(plan.kinds, s) if x)
            if all(t in point for t in w):
                value = sum(c * point[t] for t, c in w.items())
                low, high = interval(sum(c * boot[t] for t, c in w.items()))
            else:
                value = low = high = None
            averaged = None
            if sum(s) == 1:
                i = s.index(1)
                ones = [lv for lv in point if lv[i] == 1]
                zeros = [lv for lv in point if lv[i] == 0]
                if len(ones) == len(zeros) == 2 ** (k - 1):
                    averaged = sum(point[lv] for lv in ones) / len(ones) - sum(point[lv] for lv in zeros) / len(zeros)
            effects.append(Effect(name, src, value, low, high, averaged))
        full, zero = tuple([1] * k), tuple([0] * k)
        if full in point and zero in point:
            gap = point[full] - point[zero]
            low, high = interval(boot[full] - boot[zero])
            effects.append(Effect("total gap (B - A)", src, gap, low, high))
    return AttributionReport(plan, cells_ppl, effects, sources, seeds)
