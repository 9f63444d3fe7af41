"""The hook specs: the only interface between the core and its plugins.

A plugin module (built-in or third-party, found through the ``prunebench`` entry-point
group) implements any of the registration hooks: ``prunebench_components`` and
``prunebench_recipes`` (pruning methods), ``prunebench_metrics`` (what a run measures,
``harness.metrics``) and ``prunebench_adapters`` (model architectures,
``harness.adapters``). Each component a plugin returns is itself a pluggy plugin that
implements exactly the one hook of its kind below; the core calls that hook on the
component a recipe names, and only on it (``PluginHost.call``). Every kind hook is
``firstresult``: one component answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from prunebench.harness.adapters import ArchitectureAdapter
    from prunebench.harness.components import Component
    from prunebench.harness.context import LayerContext, RunContext
    from prunebench.harness.contracts import Allocation, AttentionPlan, Importance, MLPPlan, ModelShape, Recipe
    from prunebench.harness.metrics import Metric

PROJECT = "prunebench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def prunebench_components() -> list[Component]:
    """Return the component objects this plugin module provides (any kinds)."""


@hookspec
def prunebench_recipes() -> list[Recipe]:
    """Return the methods (recipes) this plugin module defines, as data."""


@hookspec
def prunebench_metrics() -> list[Metric]:
    """Return the metrics this plugin module provides (``harness.metrics.Metric``)."""


@hookspec
def prunebench_adapters() -> list[ArchitectureAdapter]:
    """Return the architecture adapters this plugin module provides
    (``harness.adapters.ArchitectureAdapter``): how to read a model family into the
    harness format and how to call its decoder layers."""


@hookspec(firstresult=True)
def transform_model(run: RunContext, params: dict[str, Any]) -> dict[str, Any] | None:
    """Change the whole model before the layer loop (e.g. SliceGPT's norm fusion and rotation).

    Edits ``run.model`` in place through ``prunebench.harness.surgery``; returns a summary dict that is
    recorded in the result.
    """


@hookspec(firstresult=True)
def score_importance(run: RunContext, params: dict[str, Any]) -> Importance | None:
    """Score prunable units of every layer (global stage; may back-propagate).

    Return None when the method has no global scores (uniform allocation needs none).
    """


@hookspec(firstresult=True)
def allocate_ratios(
    importance: Importance | None, target: float, shape: ModelShape, params: dict[str, Any]
) -> Allocation:
    """Per-layer attention and FFN ratios whose removed parameters total ``target`` of the
    decoder-layer parameters (within the model's granularity)."""


@hookspec(firstresult=True)
def compress_attention(layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
    """Plan the attention of ``layer`` with ``ratio`` of its parameters removed.

    Statistics come from ``layer.collect``; the returned plan holds the new tensors and
    is installed by the core. None leaves the attention unchanged.
    """


@hookspec(firstresult=True)
def compress_mlp(layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
    """Plan the FFN of ``layer`` with ``ratio`` of its parameters removed (it sees the
    already-compressed attention of the same layer). None leaves the FFN unchanged."""


KIND_HOOKS: dict[str, str] = {
    "transform": "transform_model",
    "importance": "score_importance",
    "allocation": "allocate_ratios",
    "attention": "compress_attention",
    "ffn": "compress_mlp",
}
"""Which hook each component kind implements."""
