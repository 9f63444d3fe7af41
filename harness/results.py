"""The results store: one JSON file per run, written atomically, with fixed top-level keys.

Scripts depend on this layout, so it is versioned (``schema``) and documented here:

- ``spec``: the run spec (model, method, overrides, sparsity, profile and its sizes,
  seed, device, dtype), ``protocol`` (everything that must match for two runs to be
  compared) and ``protocol_id`` (its hash), model and data fingerprints;
- ``recipe``: method name and every component with all its parameters;
- ``sparsity``: ``target`` and ``achieved`` (decoder-layer parameters, real tensors);
- ``params``: ``dense`` and ``pruned`` counts (``decoder``, ``total``);
- ``metrics``: ``dense`` and ``pruned``, each ``ppl`` per data source and ``zeroshot``;
- ``timings``: ``stages_s`` (wall time per stage) and ``inference`` (prefill, decode,
  one decoder layer, weight bytes, ratios to dense);
- ``memory``: peak RSS in MB;
- ``pruning``: per-layer allocation and what each layer's components did;
- ``environment``: package versions, device, git commit, host.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from prunebench.harness.cache import atomic_write_json
from prunebench.harness.errors import UsageError

TOP_LEVEL_KEYS = ("schema", "spec", "recipe", "sparsity", "params", "metrics", "timings", "memory", "pruning", "environment")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_result(path: Path, result: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written result."""
    missing = [k for k in TOP_LEVEL_KEYS if k not in result]
    if missing:
        raise ValueError(f"result lacks keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {k: result[k] for k in TOP_LEVEL_KEYS})
    return path


def read_result(path: str | Path) -> dict[str, Any]:
    """One result file as a dict, with its ``path`` (how grids pick up finished cells)."""
    data = json.loads(Path(path).read_text())
    data["path"] = str(path)
    return data


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Result dicts from files and folders (recursively), each with its ``path``."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"no such result file or folder: {p}")
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{f} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "spec" in data and "metrics" in data:
            data["path"] = str(f)
            results.append(data)
    return results


KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
"""Environment variables that change which CPU kernels run (and so the float rounding)."""


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    versions = {}
    for pkg in ("prunebench", "torch", "transformers", "lm-eval", "datasets", "pluggy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    dev = torch.device(device)
    return {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
        "versions": versions,
        "python": platform.python_version(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "host": platform.node(),
    }
