"""Cumulative ablations: a method's declared rows, run under one protocol and tabulated.

A method declares its ablation as data (``Recipe.ablation_rows``: row label and recipe,
from the most naive row to the method itself), so the core runs a paper's ablation table
without knowing the method. One extra row swaps the method's allocation for ``uniform``
(the same components at the same ratio in every layer), which is what a non-uniform
allocation has to beat. Rows run through ``run_grid``, so an ablation resumes like any
grid, and the table is rebuilt from the result files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.report import format_cell

UNIFORM_ALLOCATION = "uniform"


@dataclass(frozen=True)
class AblationRow:
    """One row: a label, the recipe it runs and the ``--set`` overrides it adds."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()


def ablation_rows(host: PluginHost, method: str, uniform: bool = True) -> list[AblationRow]:
    """The method's cumulative rows, plus the uniform-allocation row when ``uniform``."""
    recipe = host.recipe(method)
    if not recipe.ablation_rows:
        declared = sorted(name for name, r in host.recipes.items() if r.ablation_rows)
        raise UsageError(
            f"method {method!r} declares no ablation rows; methods that do: {', '.join(declared) or 'none'}"
        )
    rows = [AblationRow(label, name) for label, name in recipe.ablation_rows]
    last = rows[-1].method  # the full method of the table: the uniform row swaps its allocation only
    if uniform and host.resolve(last).components["allocation"].name != UNIFORM_ALLOCATION:
        rows.append(AblationRow(f"{rows[-1].label} (uniform ratios)", last, (f"allocation={UNIFORM_ALLOCATION}",)))
    return rows


def ablation_specs(rows: list[AblationRow], sparsities: list[float],
                   make_spec: Callable[[str, float, list[str]], Any]) -> list[Any]:
    """Grid cells, row-major: ``make_spec(method, sparsity, extra_overrides)`` for each."""
    return [make_spec(row.method, s, list(row.overrides)) for row in rows for s in sparsities]


def _cell_key(method: str, overrides: list[str] | tuple[str, ...], sparsity: float) -> tuple[str, tuple[str, ...], float]:
    return method, tuple(overrides), round(float(sparsity), 6)


def _geometric_mean(values: list[float | None]) -> float | None:
    """Perplexities over seeds average on the log scale (as the report's cells do)."""
    vals = [v for v in values if v is not None]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def ablation_table(rows: list[AblationRow], sparsities: list[float], results: list[dict[str, Any]],
                   base_overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Markdown like the paper's ablation table: one row per ablation row, and per sparsity
    the perplexity on each source (and the zero-shot average where it was measured),
    averaged over the calibration seeds a cell was run with."""
    if not results:
        raise UsageError("no ablation results to tabulate")
    by_cell: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:  # the runs of one cell over several seeds, averaged below
        by_cell.setdefault(_cell_key(r["spec"]["method"], r["spec"]["overrides"], r["sparsity"]["target"]), []).append(r)
    sources = sorted({s for r in results for s in r["metrics"]["pruned"].get("ppl", {})})
    has_zeroshot = any(r["metrics"]["pruned"].get("zeroshot") for r in results)
    header = ["row", "method"]
    for s in sparsities:
        header += [f"PPL {src} @{s:.0%}" for src in sources]
        if has_zeroshot:
            header.append(f"avg acc @{s:.0%}")
    dense = results[0]["metrics"]["dense"]
    body: list[list[str]] = [["Dense", "-", *(
        [format_cell(dense["ppl"].get(src)) for src in sources] + ([format_cell((dense.get("zeroshot") or {}).get("average"))]
                                                            if has_zeroshot else [])
    ) * len(sparsities)]]
    for row in rows:
        line = [row.label, " ".join([row.method, *(f"--set {o}" for o in row.overrides)])]
        for s in sparsities:
            runs = by_cell.get(_cell_key(row.method, [*base_overrides, *row.overrides], s), [])
            line += [format_cell(_geometric_mean([(r["metrics"]["pruned"].get("ppl") or {}).get(src) for r in runs]))
                     for src in sources]
            if has_zeroshot:
                line.append(format_cell(_mean([(r["metrics"]["pruned"].get("zeroshot") or {}).get("average") for r in runs])))
        body.append(line)
    return tabulate(body, headers=header, tablefmt="github", disable_numparse=True)

