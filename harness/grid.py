"""Comparison grids: many specs under one protocol, resumable and shardable.

A cell whose result file already exists is not run again, so an interrupted grid
resumes where it stopped; ``shard="i/n"`` runs every n-th cell starting at i, so a grid
splits across processes or machines writing into one results folder (``report`` merges).
The dense model is evaluated once per grid through the dense-metrics cache. Cells run in
this process by default, or on Ray / Slurm (``prunebench.harness.executors``).
"""

from __future__ import annotations

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


def run_grid(specs: list, results_dir: str | Path, shard: str = "0/1", show_progress: bool = True,
             host: PluginHost | None = None, runner=None, executor=None) -> list[dict[str, Any]]:
    """Run the cells of this shard that have no result yet; return all of this shard's results.

    ``executor`` (``prunebench.harness.executors``) decides where the missing cells run; by default
    they run here, one after another (``runner`` replaces ``run_experiment`` for tests).
    """
    from prunebench.harness.api import protocol_id, protocol_of, result_path, validate
    from prunebench.harness.executors import LocalExecutor
    from prunebench.harness.results import read_result

    if not specs:
        raise UsageError("a grid needs at least one method and one sparsity")
    host = host or PluginHost()
    executor = executor or LocalExecutor(runner)
    index, count = parse_shard(shard)
    cells = []
    for spec in specs:  # validate every cell before running any
        profile, recipe = validate(spec, host)
        cells.append((spec, result_path(results_dir, spec, recipe.name, protocol_id(protocol_of(spec, profile)))))
    mine = [cell for i, cell in enumerate(cells) if i % count == index]
    missing = [cell for cell in mine if not cell[1].exists()]
    fresh = iter(executor.run(missing, host=host, show_progress=show_progress) if missing else [])
    missing_paths = {path for _, path in missing}
    results = []
    for _, path in mine:
        if path in missing_paths:
            results.append(next(fresh))
        else:
            results.append(read_result(path))
    return results
