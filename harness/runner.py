"""The pruning pipeline: transform -> importance -> allocation -> layer loop.

The layer loop feeds each layer the outputs of the already-compressed layers before it,
so later layers compensate for earlier errors (as SliceGPT, FLAP and IntraSlice do).
The runner knows hooks and contracts only; it never branches on a method's name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from prunebench.harness.context import LayerContext, RunContext, embed
from prunebench.harness.contracts import Allocation, Importance, Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.progress import progress_bar
from prunebench.harness.surgery import apply_attention_plan, apply_mlp_plan


@dataclass
class PruneOutcome:
    """What pruning produced besides the (edited in place) model."""

    allocation: Allocation
    importance_meta: dict[str, Any]
    transform: dict[str, Any] | None
    layers: list[dict[str, Any]]
    stage_seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def _stage(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


def check_sparsity(target: float) -> float:
    if not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise UsageError(f"sparsity must be in [0, 1), got {target!r}")
    return float(target)


def _check_allocation(allocation: Allocation, layers: int) -> None:
    for name, ratios in (("attention", allocation.attention), ("mlp", allocation.mlp)):
        if len(ratios) != layers:
            raise ValueError(f"allocation gave {len(ratios)} {name} ratios for {layers} layers")
        bad = [r for r in ratios if not 0.0 <= float(r) <= 1.0]
        if bad:
            raise ValueError(f"allocation gave {name} ratios outside [0, 1]: {bad[:3]}")


def prune(run: RunContext, recipe: Recipe, host: PluginHost, show_progress: bool = True) -> PruneOutcome:
    """Prune ``run.model`` in place with ``recipe`` to ``run.target`` decoder sparsity."""
    check_sparsity(run.target)
    comps = recipe.components
    times: dict[str, float] = {}
    run.model.eval()

    with _stage(times, "transform"):
        # A transform may edit run.model in place or replace it (e.g. a narrower residual stream).
        transform = host.call("transform", comps["transform"], run=run)
    model = run.model
    with _stage(times, "importance"):
        importance: Importance | None = host.call("importance", comps["importance"], run=run)
    with _stage(times, "allocation"):
        shape = run.shape()
        allocation: Allocation = host.call(
            "allocation", comps["allocation"], importance=importance, target=run.target, shape=shape
        )
        _check_allocation(allocation, len(shape.layers))

    layer_notes: list[dict[str, Any]] = []
    with _stage(times, "layer_loop"):
        with _stage(times, "calibration_forward"):
            hidden = embed(model, run.calibration, run.batch_size, run.device)
        layers = model.model.layers
        with progress_bar(f"pruning {len(layers)} layers", len(layers), enabled=show_progress) as advance:
            for index in range(len(layers)):
                run.residency.acquire(model, index)
                ctx = LayerContext(run, index, hidden, importance, allocation)
                note: dict[str, Any] = {"layer": index}
                plan = host.call("attention", comps["attention"], layer=ctx, ratio=float(allocation.attention[index]))
                if plan is not None:
                    apply_attention_plan(model, index, plan)
                    note["attention"] = plan.summary
                plan = host.call("ffn", comps["ffn"], layer=ctx, ratio=float(allocation.mlp[index]))
                if plan is not None:
                    apply_mlp_plan(model, index, plan)
                    note["ffn"] = plan.summary
                hidden = ctx.outputs()
                run.residency.release(model, index, changed=True)
                if not torch.isfinite(hidden).all():
                    raise FloatingPointError(f"non-finite activations after pruning layer {index}")
                layer_notes.append(note)
                advance()
    return PruneOutcome(
        allocation=allocation,
        importance_meta=dict(importance.meta) if importance is not None else {},
        transform=transform,
        layers=layer_notes,
        stage_seconds=times,
    )
