"""Comparison grids: many specs under one protocol, resumable and shardable.

A cell is known by its content id (``harness.spec.cell_of``: protocol, resolved recipe,
sparsity, seed, tuning): a cell whose result file already exists is not run again, so an
interrupted grid resumes where it stopped, and two different cells (0.12 and 0.125, two
seeds) never share a result. ``shard="i/n"`` runs every n-th cell starting at i, so a
grid splits across processes or machines writing into one results folder (``report``
merges). The dense model is evaluated once per protocol through the dense-metrics cache.
Cells run in this process by default, or on Ray / Slurm (``harness.executors``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard expects I/N like 0/2, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return i, n


def existing_cells(results_dir: str | Path) -> dict[str, Path]:
    """Cell id -> result file, for the files of a results folder (named ``...__<cell>.json``)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        return {}
    return {p.stem.rsplit("__", 1)[-1]: p for p in sorted(folder.glob("*__*.json"))}


def plan_cells(specs: list, results_dir: str | Path, host: PluginHost) -> list[tuple[Any, Path]]:
    """(spec, result path) per spec, every spec validated before any runs; a spec repeated
    in the list (the same cell twice) is refused."""
    from prunebench.harness.session import RunSession

    if not specs:
        raise UsageError("a grid needs at least one method and one sparsity")
    cells, seen = [], {}
    for spec in specs:
        session = RunSession(spec, host=host, show_progress=False)
        if session.cell in seen:
            raise UsageError(f"the grid lists one cell twice: {seen[session.cell]} and {spec.method} at {spec.sparsity}")
        seen[session.cell] = f"{spec.method} at {spec.sparsity}"
        cells.append((spec, session.result_path(results_dir)))
    return cells


def run_grid(specs: list, results_dir: str | Path, shard: str = "0/1", show_progress: bool = True,
             host: PluginHost | None = None, runner: Callable[..., dict[str, Any]] | None = None,
             executor: Any = None) -> list[dict[str, Any]]:
    """Run the cells of this shard that have no result yet; return all of this shard's results.

    ``executor`` (``harness.executors``) decides where the missing cells run; by default
    they run here, one after another (``runner`` replaces ``run_experiment`` for tests).
    """
    from prunebench.harness.executors import LocalExecutor
    from prunebench.harness.results import read_result

    host = host or PluginHost()
    executor = executor or LocalExecutor(runner)
    index, count = parse_shard(shard)
    cells = plan_cells(specs, results_dir, host)
    mine = [cell for i, cell in enumerate(cells) if i % count == index]
    done = existing_cells(results_dir)
    missing = [cell for cell in mine if cell[1].stem.rsplit("__", 1)[-1] not in done]
    fresh = iter(executor.run(missing, host=host, show_progress=show_progress) if missing else [])
    missing_paths = {path for _, path in missing}
    results = []
    for _, path in mine:
        cell = path.stem.rsplit("__", 1)[-1]
        results.append(next(fresh) if path in missing_paths else read_result(done[cell]))
    return results


def stored_results(specs: list, results_dir: str | Path, host: PluginHost | None = None) -> list[dict[str, Any] | None]:
    """The stored result of every spec (None where its cell has not run yet), in the specs'
    order: what a summary over the whole grid reads after one shard has run."""
    from prunebench.harness.results import read_result

    done = existing_cells(results_dir)
    out: list[dict[str, Any] | None] = []
    for _, path in plan_cells(specs, results_dir, host or PluginHost()):
        cell = path.stem.rsplit("__", 1)[-1]
        out.append(read_result(done[cell]) if cell in done else None)
    return out

