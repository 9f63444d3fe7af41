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
from prunebench.harness.params import decoder_params, removed_fraction
from prunebench.harness.progress import progress_bar
from prunebench.harness.surgery import apply_attention_plan, apply_mlp_plan


@dataclass
class PruneOutcome:
    """What pruning produced besides the (edited in place) model.

    ``spent`` is how the budget was spent, as fractions of the dense decoder-layer
    parameters counted from the tensors: by the transform, and by the layer loop.
    ``allocation_target`` is the target the allocation was handed: what remained of the
    run's target after the transform, relative to the transformed model.
    """

    allocation: Allocation
    importance_meta: dict[str, Any]
    transform: dict[str, Any] | None
    layers: list[dict[str, Any]]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    allocation_target: float = 0.0


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


def remaining_target(target: float, dense_decoder: int, decoder_now: int) -> float:
    """The fraction of the current decoder parameters still to remove so that ``target`` of
    the dense ones go in all (0 when earlier stages already removed that much)."""
    if decoder_now == dense_decoder:
        return target  # nothing removed yet: exactly the run's target, not a rounded copy
    if decoder_now <= 0:
        return 0.0
    return max(0.0, 1.0 - (1.0 - target) * dense_decoder / decoder_now)


def is_noop(host: PluginHost, kind: str, ref: Any) -> bool:
    return bool(getattr(host.component(kind, ref.name), "noop", False))


def prune(run: RunContext, recipe: Recipe, host: PluginHost, show_progress: bool = True) -> PruneOutcome:
    """Prune ``run.model`` in place with ``recipe`` to ``run.target`` decoder sparsity.

    The transform sees the run's target; the allocation sees what remains of it after the
    transform (a transform that spends the whole budget, as SliceGPT's does, leaves 0).
    """
    check_sparsity(run.target)
    comps = recipe.components
    times: dict[str, float] = {}
    run.model.eval()
    dense_decoder = decoder_params(run.model)

    with _stage(times, "transform"):
        # A transform may edit run.model in place or replace it (e.g. a narrower residual stream).
        transform = host.call("transform", comps["transform"], run=run)
    model = run.model
    after_transform = decoder_params(model)
    target = remaining_target(run.target, dense_decoder, after_transform)
    with _stage(times, "importance"):
        importance: Importance | None = host.call("importance", comps["importance"], run=run)
    with _stage(times, "allocation"):
        shape = run.shape()
        allocation: Allocation = host.call(
            "allocation", comps["allocation"], importance=importance, target=target, shape=shape
        )
        _check_allocation(allocation, len(shape.layers))

    layer_notes: list[dict[str, Any]] = []
    # Both compressors no-ops (SliceGPT, an importance-only study): nothing to push the
    # calibration data through. Offloaded runs still walk the layers, which writes them out.
    skip = is_noop(host, "attention", comps["attention"]) and is_noop(host, "ffn", comps["ffn"]) and not run.residency.offloaded
    with _stage(times, "layer_loop"):
        if not skip:
            layer_notes = _layer_loop(run, model, host, comps, importance, allocation, show_progress, times)
    return PruneOutcome(
        allocation=allocation,
        importance_meta=dict(importance.meta) if importance is not None else {},
        transform=transform,
        layers=layer_notes,
        stage_seconds=times,
        spent={"transform": removed_fraction(dense_decoder, after_transform),
               "layers": (after_transform - decoder_params(model)) / dense_decoder},
        allocation_target=target,
    )


def _layer_loop(run: RunContext, model: Any, host: PluginHost, comps: dict[str, Any], importance: Importance | None,
                allocation: Allocation, show_progress: bool, times: dict[str, float]) -> list[dict[str, Any]]:
    """Compress every layer in order, each fed the outputs of the compressed layers before it."""
    layer_notes: list[dict[str, Any]] = []
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
    return layer_notes
