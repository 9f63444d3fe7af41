"""Metrics as plugins: what a run measures on the dense and the pruned model.

A metric is an object registered through the ``prunebench_metrics`` hook (built-ins in
``harness.builtin_metrics``, listed in the entry-point group like every plugin), selected
per run by name (``RunSpec.metrics``, ``--metrics``). The run session calls ``measure``
once per phase it declares and stores the returned keys under
``result["metrics"][phase]``; the report asks ``measures`` for the columns, values and
noise of any registered metric, so a new metric touches only its own module.

Noise: a ``Measure`` can carry per-unit values that pair across results measured under
one protocol (e.g. the mean NLL of every evaluation window), or a standard error (e.g.
lm-eval's for an accuracy). ``harness.verdicts`` turns them, with the calibration seeds,
into intervals and better / worse / no-difference verdicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from prunebench.harness.errors import UsageError

if TYPE_CHECKING:
    import torch

    from prunebench.harness.context import LayerResidency
    from prunebench.harness.profiles import Profile
    from prunebench.harness.spec import RunSpec

PHASES = ("dense", "pruned")


@dataclass
class MetricContext:
    """What a metric sees when it measures one model.

    ``model`` is the model being measured, in the harness format (dense: the converted
    source; pruned: the result of pruning). ``source_model`` is the stock transformers
    model (None for an offloaded run): what whole-model timings compare against.
    ``dense`` holds the dense phase's metrics when the pruned phase is measured.
    """

    phase: str
    spec: RunSpec
    profile: Profile
    model: Any
    tokenizer: Any
    windows: dict[str, torch.Tensor]
    device: Any
    source_model: Any = None
    residency: LayerResidency | None = None
    dense: dict[str, Any] = field(default_factory=dict)
    model_fingerprint: str = ""
    show_progress: bool = False


@dataclass(frozen=True)
class Measure:
    """One reported quantity of a result (a report column), with what its noise needs.

    ``better`` is "lower", "higher" or None (no verdicts). For intervals and verdicts a
    measure gives either ``units`` (values of the same evaluation units in every result
    of its protocol, e.g. per-window mean NLL; the statistic is their mean, shown through
    ``display``, e.g. exp for a perplexity) or ``stderr`` (the standard error of ``value``
    from its own evaluation, e.g. lm-eval's). ``headline`` measures get verdicts.
    """

    key: str
    header: str
    value: float | None
    better: str | None = None
    units: tuple[float, ...] | None = None
    display: str = "identity"  # "identity" or "exp": how the mean of ``units`` becomes ``value``
    stderr: float | None = None
    headline: bool = False
    flag: str | None = None  # a caveat shown next to the value (e.g. "load" for a timing taken under load)


class Metric(ABC):
    """Subclass it: set ``name``, ``keys`` (the result keys it writes per phase) and
    implement ``measure`` and ``measures``.

    ``default`` metrics are measured unless a run names its metrics; ``phases`` are the
    phases it is measured on; ``dense_cached`` metrics of the dense model are cached by
    ``dense_cache_parts`` (everything their value depends on), so a grid measures the
    dense model once; ``supports_offload`` metrics work with one layer in memory at a time.
    """

    name: ClassVar[str]
    keys: ClassVar[tuple[str, ...]]
    phases: ClassVar[tuple[str, ...]] = PHASES
    default: ClassVar[bool] = True
    dense_cached: ClassVar[bool] = False
    supports_offload: ClassVar[bool] = False

    def settings(self, spec: RunSpec, profile: Profile) -> dict[str, Any] | None:
        """The protocol-relevant settings (two results compare only if these are equal);
        None when the metric has none (it then never splits a protocol)."""
        return None

    def check(self, spec: RunSpec, profile: Profile) -> None:  # noqa: B027 (optional: most metrics have nothing to check)
        """Refuse bad settings before any compute (``UsageError``)."""

    def dense_cache_parts(self, ctx: MetricContext) -> Any:
        """What the dense value depends on beyond the metric's settings (hashed into the cache key)."""
        return None

    @abstractmethod
    def measure(self, ctx: MetricContext) -> dict[str, Any]:
        """Measure ``ctx.model``; returns ``{key: value}`` for the keys the metric owns."""

    def measures(self, block: dict[str, Any], result: dict[str, Any]) -> list[Measure]:
        """The report columns of this metric from one phase's ``block`` of ``result``."""
        return []

    @property
    def summary(self) -> str:
        doc = (type(self).__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        return f"<metric {self.name!r}>"


def default_metric_names(metrics: dict[str, Metric], spec: RunSpec, profile: Profile) -> list[str]:
    """The metrics a run measures when it does not name them: every default metric, less
    zero-shot (switched off, or no tasks) and timing (switched off)."""
    names = [name for name, m in metrics.items() if m.default]
    if not spec.zeroshot or not profile.tasks:
        names = [n for n in names if n != "zeroshot"]
    if not spec.timing:
        names = [n for n in names if n != "timing"]
    return names


def select_metrics(metrics: dict[str, Metric], spec: RunSpec, profile: Profile, offloaded: bool = False) -> list[Metric]:
    """The run's metrics, checked: known names, no two writing one key, settings valid,
    and each able to run on an offloaded model when the run is offloaded."""
    names = list(spec.metrics) if spec.metrics is not None else default_metric_names(metrics, spec, profile)
    unknown = [n for n in names if n not in metrics]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; valid metrics: {', '.join(sorted(metrics))}")
    if spec.metrics is not None:
        if "zeroshot" in names and not spec.zeroshot:
            raise UsageError("--metrics names zeroshot but zero-shot is switched off (--no-zeroshot)")
        if "timing" in names and not spec.timing:
            raise UsageError("--metrics names timing but timing is switched off (--no-timing)")
    chosen = [metrics[n] for n in dict.fromkeys(names)]
    owner: dict[str, str] = {}
    for metric in chosen:
        for key in metric.keys:
            if key in owner:
                raise UsageError(f"metrics {owner[key]!r} and {metric.name!r} both write {key!r}")
            owner[key] = metric.name
        if offloaded and not metric.supports_offload:
            raise UsageError(f"metric {metric.name!r} cannot run on an offloaded model; measure it on the saved checkpoint")
        metric.check(spec, profile)
    return chosen


def metric_settings(chosen: list[Metric], spec: RunSpec, profile: Profile) -> dict[str, Any]:
    return {m.name: m.settings(spec, profile) for m in chosen}

