"""The results store: one JSON file per run, written atomically, with one schema for every
kind of run (in memory, offloaded, regression case, benchmark).

Scripts depend on this layout, so it is versioned (``schema``) and documented here.
Schema 2 (this version):

- ``kind``: ``run`` (in memory) or ``offload`` (layer by layer);
- ``cell``: the content id of the cell (``harness.spec.cell_of``), also the file name's tail;
- ``spec``: the run spec (``harness.spec.RunSpec`` fields), ``protocol`` (everything that
  must match for two runs to be compared; no method, sparsity or seed) and its
  ``protocol_id``, model and data fingerprints;
- ``recipe``: method name and every component with all its parameters;
- ``sparsity``: ONE record: ``target`` (None when a component parameter set the budget),
  ``achieved`` (decoder-layer parameters removed, counted from the tensors), ``set_by``
  (``target`` or the ``KIND.PARAM=VALUE`` that set it), ``spent`` (fractions of the dense
  decoder removed by the transform and by the layer loop), ``allocation_target`` (what the
  allocation was handed after the transform) and ``paper_count`` (what a per-head /
  per-neuron count would claim, ``harness.params.paper_count_sparsity``);
- ``params``: ``dense`` and ``pruned`` counts (``decoder``, ``total``);
- ``metrics``: ``dense`` and ``pruned``, each holding the keys of every measured metric
  (``ppl`` and ``ppl_windows`` per source, ``zeroshot``, ``timing``, ``kv_cache``, or a
  plugin's own; ``harness.metrics``);
- ``timings``: ``stages_s``, wall time per stage;
- ``memory``: peak RSS in MB (overall, after pruning, per stage where measured);
- ``pruning``: per-layer allocation and what each layer's components did;
- ``tuning``: held-out selection of tuned parameters, or None (``harness.tuning``);
- ``environment``: package versions, device, CPU and its kernel path, git commit, host.

Older files are upgraded when read (``upgrade``): schema-1 run results, and the offload
benchmark files (``scripts/bench_offload.py``), whose runs become schema-2 results of
kind ``offload``. ``prunebench results migrate`` rewrites them in place.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prunebench.harness.cache import atomic_write_json
from prunebench.harness.errors import UsageError

RESULT_SCHEMA = 2
TOP_LEVEL_KEYS = ("schema", "kind", "cell", "spec", "recipe", "sparsity", "params", "metrics", "timings", "memory",
                  "pruning", "tuning", "environment")
KINDS = ("run", "offload")


@dataclass
class SparsityRecord:
    """How much of the decoder a run removed, and what decided it (module docstring)."""

    target: float | None
    achieved: float
    set_by: str = "target"
    spent: dict[str, float] | None = None
    allocation_target: float | None = None
    paper_count: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """A run's result, typed; ``to_dict`` is the schema-2 JSON."""

    kind: str
    cell: str
    spec: dict[str, Any]
    recipe: dict[str, Any]
    sparsity: SparsityRecord
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    timings: dict[str, Any]
    memory: dict[str, Any]
    pruning: dict[str, Any]
    environment: dict[str, Any]
    tuning: dict[str, Any] | None = None
    schema: int = RESULT_SCHEMA
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in TOP_LEVEL_KEYS}
        out["sparsity"] = self.sparsity.to_dict()
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        data = upgrade(data)
        fields = {k: data[k] for k in TOP_LEVEL_KEYS if k != "sparsity"}
        return cls(**fields, sparsity=SparsityRecord(**data["sparsity"]), path=data.get("path"))


def write_result(path: Path, result: dict[str, Any] | RunResult) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written result."""
    data = result.to_dict() if isinstance(result, RunResult) else result
    missing = [k for k in TOP_LEVEL_KEYS if k not in data]
    if missing:
        raise ValueError(f"result lacks keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {k: data[k] for k in TOP_LEVEL_KEYS})
    return path


# ----- reading and upgrading ----------------------------------------------------------------
def _schema1_protocol(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema-2 protocol of a schema-1 run, from the protocol it recorded."""
    from prunebench.harness.spec import device_type

    old = spec["protocol"]
    prof = old["profile"]
    metrics: dict[str, Any] = {"ppl": {"sources": list(prof["eval_sources"]), "samples": prof["eval_samples"],
                                       "seqlen": prof["eval_seqlen"]}}
    if old.get("zeroshot") and prof.get("tasks"):
        metrics["zeroshot"] = {"tasks": list(prof["tasks"]), "limit": prof.get("task_limit"),
                               "batch_size": prof.get("task_batch_size"), "max_length": prof.get("task_max_length")}
    if old.get("timing"):
        metrics["timing"] = dict(prof.get("timing") or {})
    return {
        "model": old["model"], "dtype": old["dtype"], "device_type": device_type(old.get("device_type", spec.get("device", "cpu"))),
        "calibration": {"source": prof["calibration_source"], "samples": prof["calibration_samples"],
                        "seqlen": prof["calibration_seqlen"], "batch_size": prof["batch_size"]},
        "metrics": dict(sorted(metrics.items())),
    }


def _upgrade_schema1(data: dict[str, Any]) -> dict[str, Any]:
    from prunebench.harness.spec import cell_of, protocol_id

    out = dict(data)
    spec = dict(data["spec"])
    protocol = _schema1_protocol(spec)
    spec["protocol_v1"], spec["protocol_id_v1"] = spec.get("protocol"), spec.get("protocol_id")
    spec["protocol"], spec["protocol_id"] = protocol, protocol_id(protocol)
    out["spec"] = spec
    timings = dict(data.get("timings") or {})
    metrics = {phase: dict(block) for phase, block in (data.get("metrics") or {}).items()}
    inference = timings.pop("inference", None)
    if inference:
        metrics.setdefault("pruned", {})["timing"] = inference
    out.update(
        schema=RESULT_SCHEMA, kind="run", timings=timings, metrics=metrics, tuning=None,
        cell=cell_of(protocol, data["recipe"], spec.get("sparsity"), int(spec.get("seed", 0))),
        sparsity=SparsityRecord(data["sparsity"]["target"], data["sparsity"]["achieved"]).to_dict(),
    )
    return out


def _offload_bench_results(data: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The runs of an offload benchmark file (``scripts/bench_offload.py``, before schema 2)
    as schema-2 results of kind ``offload``."""
    from prunebench.harness.spec import cell_of, protocol_id

    settings, model = data.get("settings") or {}, data.get("model") or {}
    shape = model.get("shape") or {}
    name = f"random-llama-{model.get('parameters', 0) / 1e9:.2f}B"
    protocol = {
        "model": name, "dtype": "float32", "device_type": "cpu",
        "calibration": {"source": "wiki-offline", "samples": settings.get("calibration_samples"),
                        "seqlen": settings.get("calibration_seqlen"), "batch_size": 4},
        "metrics": {"ppl": {"sources": ["wiki-offline"], "samples": settings.get("eval_samples"),
                            "seqlen": settings.get("eval_seqlen")}},
    }
    out = []
    for run in data.get("runs") or []:
        if run.get("status", 0) != 0 or "metrics" not in run:
            continue
        recipe = {"method": run["method"], "name": run["method"], "components": {}}
        target = (run.get("sparsity") or {}).get("target", settings.get("sparsity"))
        spec = {"model": name, "method": run["method"], "sparsity": target, "seed": 0, "dtype": "float32",
                "device": "cpu", "profile": "offload-benchmark", "protocol": protocol,
                "protocol_id": protocol_id(protocol), "model_shape": shape, "source_file": path}
        metrics = run["metrics"]
        out.append({
            "schema": RESULT_SCHEMA, "kind": "offload", "spec": spec, "recipe": recipe,
            "cell": cell_of(protocol, {"method": run["method"]}, target, 0),
            "sparsity": SparsityRecord(target, (run.get("sparsity") or {}).get("achieved")).to_dict(),
            "params": {"dense": {"decoder": (run.get("params") or {}).get("dense_decoder")},
                       "pruned": {"decoder": (run.get("params") or {}).get("pruned_decoder")}},
            "metrics": {"dense": {"ppl": {"wiki-offline": metrics.get("dense_ppl")}},
                        "pruned": {"ppl": {"wiki-offline": metrics.get("pruned_ppl")}}},
            "timings": {"stages_s": dict(run.get("seconds") or {})},
            "memory": {"peak_rss_mb": run.get("peak_rss_mb"), "by_stage": run.get("peak_rss_by_stage_mb"),
                       "budget_mb": run.get("budget_mb")},
            "pruning": {"layer_reads": run.get("layer_reads")}, "tuning": None,
            "environment": {"threads": data.get("threads")}, "path": path,
        })
    return out


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A result dict in the current schema (older run results are converted; the current
    schema is returned as it is)."""
    schema = data.get("schema")
    if schema == RESULT_SCHEMA:
        return data
    if schema == 1:
        return _upgrade_schema1(data)
    raise ValueError(f"unknown result schema {schema!r}")


def results_in(data: Any, path: str) -> tuple[list[dict[str, Any]], str | None]:
    """The results one JSON file holds (upgraded), or why it holds none."""
    if not isinstance(data, dict):
        return [], "not a JSON object"
    if "spec" in data and "metrics" in data:
        try:
            result = upgrade(data)
        except (KeyError, TypeError, ValueError) as exc:
            return [], f"a run result that cannot be upgraded ({type(exc).__name__}: {exc})"
        return [{**result, "path": path}], None
    if isinstance(data.get("runs"), list) and "settings" in data and "model" in data:
        runs = _offload_bench_results(data, path)
        return (runs, None) if runs else ([], "an offload benchmark file without finished runs")
    if "cases" in data and "tolerance" in data:
        return [], "regression expectations, not a run result"
    if "models" in data or "rows" in data or "sweep" in data:
        return [], "a sweep or benchmark table, not a run result"
    return [], "not a run result (no spec and metrics)"


def read_result(path: str | Path) -> dict[str, Any]:
    """One result file as a dict, upgraded, with its ``path`` (how grids pick up finished cells)."""
    data = json.loads(Path(path).read_text())
    found, why = results_in(data, str(path))
    if not found:
        raise UsageError(f"{path}: {why}")
    return found[0]


def _json_files(paths: list[str | Path]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(p.rglob("*.json"))
        elif p.is_file():
            yield p
        else:
            raise UsageError(f"no such result file or folder: {p}")


def load_results(paths: list[str | Path]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Result dicts from files and folders (recursively), each with its ``path``, and the
    files that hold no result with the reason: nothing is skipped silently."""
    results: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for f in _json_files(paths):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            skipped.append((str(f), f"not valid JSON ({exc})"))
            continue
        found, why = results_in(data, str(f))
        results.extend(found)
        if why:
            skipped.append((str(f), why))
    return results, skipped


def migrate(paths: list[str | Path], dry_run: bool = False) -> list[tuple[str, str]]:
    """Rewrite older run results in the current schema, in place (atomically).

    Returns (path, what happened) per file; files already current, or not run results,
    are left alone. Offload benchmark files keep their layout (they are read as results).
    """
    done = []
    for f in _json_files(paths):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            done.append((str(f), "skipped: not valid JSON"))
            continue
        if not isinstance(data, dict) or "spec" not in data or data.get("schema") == RESULT_SCHEMA:
            continue
        try:
            upgraded = upgrade(data)
        except (KeyError, TypeError, ValueError) as exc:
            done.append((str(f), f"skipped: cannot be upgraded ({type(exc).__name__}: {exc})"))
            continue
        if not dry_run:
            write_result(f, upgraded)
        done.append((str(f), f"schema {data.get('schema')} -> {RESULT_SCHEMA}"))
    return done


# ----- environment ----------------------------------------------------------------------------
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


def git_commit() -> str | None:
    """The commit of the code that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], check=False, capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    import torch

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
        "git_commit": git_commit(),
        "host": platform.node(),
    }
