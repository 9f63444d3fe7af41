"""Where grid cells run: in this process (default), as Ray tasks, or as Slurm jobs (submitit).

A grid is many independent runs; the harness hands them to an existing engine instead of
scheduling them itself. Every executor gets the cells that have no result yet and
returns their results in the same order. The driver writes every result file itself
(the workers return the result dict), so results land in one store even when the
workers share no file system with it, and ``report`` merges them as usual. A cell that
fails is retried once; if it fails again the others still finish and are written, and
then ``GridFailure`` names every failed cell with its error: nothing is dropped silently.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from prunebench.harness.errors import PruneBenchError, UsageError

EXECUTORS = ("local", "ray", "slurm")


class GridFailure(PruneBenchError):
    """Some cells failed twice; the rest were run and written."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        self.failures = failures
        lines = "; ".join(f"{cell}: {error}" for cell, error in failures)
        super().__init__(f"{len(failures)} grid cell(s) failed after one retry: {lines}")


@dataclass(frozen=True)
class Resources:
    """What one cell declares to the engine (Ray task options, Slurm job size)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float | None = None


class Executor(Protocol):
    def run(self, cells: list[tuple[Any, Path]], host: Any, show_progress: bool) -> list[dict[str, Any]]:
        """Run ``(spec, result path)`` cells; write each result to its path; return them in order."""


def cell_name(spec: Any) -> str:
    over = f" [{', '.join(spec.overrides)}]" if spec.overrides else ""
    at = "set" if spec.sparsity is None else f"{spec.sparsity:g}"
    return f"{spec.model}/{spec.method}{over}@{at} seed {spec.seed}"


def _run_spec_dict(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """The worker side: one cell from a plain dict (picklable anywhere), result returned."""
    from prunebench.harness.session import run_experiment
    from prunebench.harness.spec import RunSpec

    return run_experiment(RunSpec.from_dict(spec_dict), results_dir=None, show_progress=False)


def _write(result: dict[str, Any], path: Path) -> dict[str, Any]:
    from prunebench.harness.results import write_result

    result = dict(result)
    result["path"] = str(write_result(path, result))
    return result


class LocalExecutor:
    """Cells one after another in this process (``runner`` is replaceable for tests). A cell
    whose result appeared while earlier cells ran (another process working on the same
    folder) is read, not rerun."""

    def __init__(self, runner: Callable[..., dict[str, Any]] | None = None) -> None:
        self.runner = runner

    def run(self, cells, host, show_progress):
        from prunebench.harness.results import read_result
        from prunebench.harness.session import run_experiment

        runner = self.runner or run_experiment
        out = []
        for spec, path in cells:
            if path.exists():  # finished meanwhile by another process sharing the folder
                out.append(read_result(path))
            else:
                out.append(runner(spec, results_dir=path.parent, host=host, show_progress=show_progress))
        return out


class RayExecutor:
    """Each cell is a Ray task with declared resources, on a local Ray instance (``workers``
    CPUs' worth of parallel cells) or on the cluster at ``address``. Ray retries a task
    that raised once (``max_retries=1, retry_exceptions=True``)."""

    def __init__(self, address: str | None = None, workers: int = 2, resources: Resources = Resources()) -> None:
        self.address, self.workers, self.resources = address, workers, resources

    def run(self, cells, host, show_progress):
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'prunebench[cluster]' (or pip install ray)") from None
        started_here = not ray.is_initialized()
        if started_here:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, int(self.workers * self.resources.cpus)), num_gpus=0 if not self.resources.gpus else None,
                         include_dashboard=False, log_to_driver=False)
        try:
            options: dict[str, Any] = {"num_cpus": self.resources.cpus, "num_gpus": self.resources.gpus,
                                       "max_retries": 1, "retry_exceptions": True}
            if self.resources.memory_gb:
                options["memory"] = int(self.resources.memory_gb * 1024**3)
            task = ray.remote(_run_spec_dict).options(**options)
            refs = [task.remote(asdict(spec)) for spec, _ in cells]
            out: list[dict[str, Any] | None] = []
            failures: list[tuple[str, str]] = []
            for (spec, path), ref in zip(cells, refs):
                try:
                    out.append(_write(ray.get(ref), path))
                except Exception as exc:  # any worker error is reported with its cell
                    failures.append((cell_name(spec), _first_line(exc)))
                    out.append(None)
            if failures:
                raise GridFailure(failures)
            return out
        finally:
            if started_here:
                ray.shutdown()


class SlurmExecutor:
    """Each cell is a Slurm job submitted through submitit (``cluster="debug"`` runs the same
    code path in this process, for tests). A failed job is resubmitted once."""

    def __init__(self, folder: str | Path = "runs/slurm", resources: Resources = Resources(),
                 timeout_min: int = 240, partition: str | None = None, cluster: str | None = None) -> None:
        self.folder, self.resources, self.timeout_min = Path(folder), resources, timeout_min
        self.partition, self.cluster = partition, cluster

    def run(self, cells, host, show_progress):
        try:
            import submitit
        except ImportError:
            raise UsageError("--executor slurm needs submitit: pip install 'prunebench[cluster]'") from None
        executor = submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.timeout_min, "cpus_per_task": max(1, int(self.resources.cpus))}
        if self.resources.gpus:
            params["gpus_per_node"] = int(self.resources.gpus)
        if self.resources.memory_gb:
            params["mem_gb"] = self.resources.memory_gb
        if self.partition:
            params["slurm_partition"] = self.partition
        executor.update_parameters(**params)
        jobs = [executor.submit(_run_spec_dict, asdict(spec)) for spec, _ in cells]
        out: list[dict[str, Any] | None] = []
        failures: list[tuple[str, str]] = []
        for (spec, path), job in zip(cells, jobs):
            result = None
            for attempt in range(2):
                try:
                    result = job.result()
                    break
                except Exception as exc:  # any job error is retried once, then reported
                    if attempt == 1:
                        failures.append((cell_name(spec), _first_line(exc)))
                    else:
                        job = executor.submit(_run_spec_dict, asdict(spec))
            out.append(_write(result, path) if result is not None else None)
        if failures:
            raise GridFailure(failures)
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray and submitit wrap the worker's traceback: its last line is the worker's error.
    return lines[-1][:300] if lines else "".join(traceback.format_exception_only(type(exc), exc)).strip()


def make_executor(name: str, *, address: str | None = None, workers: int = 2, resources: Resources = Resources(),
                  folder: str | Path = "runs/slurm", partition: str | None = None) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, workers=workers, resources=resources)
    if name == "slurm":
        return SlurmExecutor(folder=folder, resources=resources, partition=partition)
    raise UsageError(f"unknown executor {name!r}; valid executors: {', '.join(EXECUTORS)}")
