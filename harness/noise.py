"""How far a cell's numbers move when nothing but the noise changes: ``prunebench noise``.

Three sources move a pruned model's perplexity without any change to the method:

* the calibration seed (a different sample of calibration windows);
* the thread count: float sums are split differently across threads;
* the CPU's kernel path: PyTorch's vectorised kernels (``ATEN_CPU_CAPABILITY``) and MKL's
  code path (``MKL_ENABLE_INSTRUCTIONS``) round differently; on a newer CPU they are
  AVX-512 or AMX, on an older one AVX2 or scalar code (``scripts/kernel_paths.py`` shows
  which kernels change on a machine).

Pruning turns a rounding difference into a different discrete choice (a head, a channel),
so the last two can move a cell as much as the first. ``measure`` runs one cell under
every seed (in this process) and every setting (a child process each, with its own cache
folder, so no cached statistic hides the setting), each into its own results folder;
``table`` states per method and source the values and the spread (max / min - 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from tabulate import tabulate

from prunebench.harness.errors import UsageError

SETTINGS: dict[str, dict[str, str]] = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "scalar kernels": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2 kernels": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
"""Settings a cell can be rerun under (the seeds run under the caller's own environment)."""


def folder_name(setting: str) -> str:
    return "setting-" + "".join(c if c.isalnum() else "-" for c in setting)


def measure(run_argv: list[str], seeds: list[int], settings: list[str], results: Path) -> None:
    """Run ``prunebench run <run_argv>`` for every seed (into ``results/seeds``) and, at the
    first seed, under every setting (into ``results/setting-...``), skipping what exists."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise UsageError(f"unknown noise setting(s) {', '.join(unknown)}; valid: {', '.join(SETTINGS)}")
    jobs = [({}, results / "seeds", seed) for seed in seeds]
    jobs += [(SETTINGS[s], results / folder_name(s), seeds[0]) for s in settings]
    for env, folder, seed in jobs:
        cache = {"PRUNEBENCH_CACHE": str(results / f".cache-{folder.name}")} if env else {}
        argv = [sys.executable, "-m", "prunebench", "run", *run_argv, "--seed", str(seed), "--results", str(folder), "--quiet"]
        subprocess.run(argv, env={**os.environ, **env, **cache}, check=True)


def _key(result: dict[str, Any]) -> tuple[str, float | None]:
    return result["recipe"]["name"], result["sparsity"]["target"]


def table(groups: dict[str, list[dict[str, Any]]], seeds_label: str = "seeds") -> str:
    """Per method, sparsity and perplexity source: the value under every seed and setting
    and the spreads (max / min - 1) over the seeds and over the settings at the first seed.
    ``groups`` maps a label (``seeds_label`` for the seed runs, else a setting) to results."""
    from prunebench.harness.report import canonical_names

    values: dict[tuple, dict[str, float]] = defaultdict(dict)
    for label, results in groups.items():
        for r in canonical_names(results):
            for source, ppl in (r["metrics"]["pruned"].get("ppl") or {}).items():
                column = f"seed {r['spec'].get('seed', 0)}" if label == seeds_label else label
                values[(*_key(r), source)][column] = ppl
    columns = sorted({c for v in values.values() for c in v if c.startswith("seed ")})
    settings = [label for label in groups if label != seeds_label]
    rows = []
    for (method, sparsity, source), got in sorted(values.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0, kv[0][2])):
        seed_values = [got[c] for c in columns if c in got]
        first = got.get(columns[0]) if columns else None
        setting_values = [v for v in [first, *(got.get(s) for s in settings)] if v is not None]
        rows.append([method, sparsity, source, *[_fmt(got.get(c)) for c in columns], *[_fmt(got.get(s)) for s in settings],
                     _spread(seed_values), _spread(setting_values)])
    header = ["method", "sparsity", "PPL of", *columns, *settings, "spread over seeds", f"spread over settings ({columns[0] if columns else '-'})"]
    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _spread(values: list[float]) -> str:
    return f"{max(values) / min(values) - 1:.1%}" if len(values) > 1 else "-"
