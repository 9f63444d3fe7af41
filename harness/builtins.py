"""Method-independent components: the no-op of every kind, and uniform allocation.

They are registered through the entry-point group like every other plugin module. A
recipe that does not name a kind gets that kind's no-op here.
"""

from __future__ import annotations

from typing import Any

from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext, RunContext
from prunebench.harness.contracts import Allocation, Importance, ModelShape
from prunebench.harness.hookspecs import hookimpl


class NoTransform(Component):
    """Leave the model as it is before the layer loop."""

    kind, name = "transform", "none"
    streams_layers = True

    @hookimpl
    def transform_model(self, run: RunContext, params: dict[str, Any]) -> None:
        return None


class NoImportance(Component):
    """No global scores (components score locally)."""

    kind, name = "importance", "none"
    streams_layers = True

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> None:
        return None


class UniformAllocation(Component):
    """Every layer at the target ratio; ``attention``/``ffn`` override one module kind
    (e.g. attention=0.3, ffn=0 for an attention-only study)."""

    kind, name = "allocation", "uniform"
    defaults = {"attention": None, "ffn": None}

    @hookimpl
    def allocate_ratios(
        self, importance: Importance | None, target: float, shape: ModelShape, params: dict[str, Any]
    ) -> Allocation:
        att = target if params["attention"] is None else float(params["attention"])
        ffn = target if params["ffn"] is None else float(params["ffn"])
        n = len(shape.layers)
        return Allocation([att] * n, [ffn] * n, meta={"rule": "uniform", "attention": att, "ffn": ffn})


class KeepAttention(Component):
    """Leave attention unpruned."""

    kind, name = "attention", "keep"
    noop = True

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> None:
        return None


class KeepFFN(Component):
    """Leave the FFN unpruned."""

    kind, name = "ffn", "keep"
    noop = True

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> None:
        return None


@hookimpl
def prunebench_components() -> list[Component]:
    return [NoTransform(), NoImportance(), UniformAllocation(), KeepAttention(), KeepFFN()]
