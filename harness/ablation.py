"""Cumulative ablations: a method's declared rows, run under one protocol and tabulated.

A method declares its ablation as data (``Recipe.ablation_rows``: row label and recipe,
from the most naive row to the method itself), so the core runs a paper's ablation table
without knowing the method. One extra row swaps the method's allocation for ``uniform``
(the same components at the same ratio in every layer), which is what a non-uniform
allocation has to beat. Rows run through ``run_grid``, so an ablation resumes like any
grid, and the table is rebuilt from the result files.
"""

from __future__ import annotations

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
    if uniform and host.resolve(method).components["allocation"].name != UNIFORM_ALLOCATION:
        rows.append(AblationRow(f"{rows[-1].label} (uniform ratios)", method, (f"allocation={UNIFORM_ALLOCATION}",)))
    return rows


def ablation_specs(rows: list[AblationRow], sparsities: list[float],
                   make_spec: Callable[[str, float, list[str]], Any]) -> list[Any]:
    """Grid cells, row-major: ``make_spec(method, sparsity, extra_overrides)`` for each."""
    return [make_spec(row.method, s, list(row.overrides)) for row in rows for s in sparsities]


def _cell_key(method: str, overrides: list[str] | tuple[str, ...], sparsity: float) -> tuple[str, tuple[str, ...], float]:
    return method, tuple(overrides), round(float(sparsity), 6)


def ablation_table(rows: list[AblationRow], sparsities: list[float], results: list[dict[str, Any]],
                   base_overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Markdown like the paper's ablation table: one row per ablation row, and per sparsity
    the perplexity on each source (and the zero-shot average where it was measured)."""
    if not results:
        raise UsageError("no ablation results to tabulate")
    by_cell = {
        _cell_key(r["spec"]["method"], r["spec"]["overrides"], r["sparsity"]["target"]): r for r in results
    }
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
            r = by_cell.get(_cell_key(row.method, [*base_overrides, *row.overrides], s))
            metrics = r["metrics"]["pruned"] if r else {}
            line += [format_cell(metrics.get("ppl", {}).get(src)) for src in sources]
            if has_zeroshot:
                line.append(format_cell((metrics.get("zeroshot") or {}).get("average")))
        body.append(line)
    return tabulate(body, headers=header, tablefmt="github", disable_numparse=True)

