"""Global non-uniform ratios from importance scores (IntraSlice section 3.3, Algorithm 1).

``global``: per module kind (attention, FFN), the units of all layers are ranked together
and the least important are removed until that kind's parameter budget is spent; a
layer's ratio is then the fraction of its module's parameters whose units were removed.

The budget split follows the reference (Asker0Lee/IntraSlice ``search_param_pca``):
with target sparsity t, pruning bias lambda_b, FFN parameters P_M and total decoder
parameters P, the FFN removes lambda_b * t * P_M (its overall ratio is lambda_b * t)
and the attention absorbs the rest, t * P - removed FFN, so the total always meets
the target; lambda_b = 1 gives both kinds the target ratio overall, lambda_b < 1 spares
the FFN. Within a kind:

* Units: FFN intermediate channels (or PCA components, for ``mask-grad-pca``); for
  attention the o_proj input channels/components when the importance provides them
  (``attention_unit="channel"``, ``ChannelImportance.attention_channels``), else whole
  query heads. A unit costs its module's parameters divided by its number of units, so
  removing a fraction f of a layer's units removes f of that module's parameters.
* Ranking score: ``normalise="cost"`` (default) ranks score per parameter of the unit
  (importance / unit cost), so units of layers with different widths compare on the
  loss they cost per parameter saved; for layers of equal shape it is the reference's
  raw ranking. ``normalise="none"`` ranks raw scores.
* Cap: no layer loses more than ``cap`` (default 0.8) of a module. The cap is part of
  the selection (a capped layer's units are skipped and the next least important unit
  elsewhere is taken), instead of the reference's post-hoc re-spreading of the excess.
* Ties: units of equal score are removed in the same fraction from every layer, so equal
  importances give a uniform allocation.
* Granularity: FFN ratios are rounded so each layer keeps a multiple of ``multiple``
  channels (when its width allows); the attention ratios stay continuous and absorb
  the rounding, so ``Allocation.removed_params(shape) == t * P`` up to float error.
  Where the attention cannot absorb it (capped everywhere, or no budget left when
  lambda_b is large), FFN layers move by one rounding step each, those rounded furthest
  from their wanted ratio first, until the total is within one step of the target.
  The attention compressor then turns its ratio into heads and dims (``head-prune``
  rounds to whole heads, so its achieved sparsity can differ by up to half a head
  per layer).

Departures from the reference: caps inside the selection (above); the cost
normalisation (a no-op for dense models of equal layers); continuous attention ratios
instead of whole heads split into ``frac`` sub-blocks; budgets in parameters
(``ModelShape``), not re-derived from config constants, so GQA, biases and already
pruned layers are counted from the real tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from prunebench.harness.budget import round_to_multiple
from prunebench.harness.components import Component
from prunebench.harness.contracts import Allocation, Importance, LayerShape, ModelShape
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl


@dataclass
class UnitPool:
    """One module kind of every layer: unit scores, the cost of one unit, the module size."""

    scores: list[torch.Tensor]  # per layer, float64, one per unit
    unit_cost: list[float]  # parameters per unit, per layer
    capacity: list[float]  # module parameters, per layer

    def ranking_scores(self, normalise: str) -> list[torch.Tensor]:
        if normalise == "none":
            return self.scores
        if normalise == "cost":
            return [s / c if c > 0 else s for s, c in zip(self.scores, self.unit_cost)]
        raise UsageError(f"unknown normalise {normalise!r}; valid: cost, none")


def remove_lowest(scores: Sequence[torch.Tensor], unit_cost: Sequence[float], limit: Sequence[float], budget: float) -> list[float]:
    """Parameters removed per layer when the lowest-scoring units of all layers go first
    until ``budget`` parameters are removed; layer l never loses more than ``limit[l]``.

    Finds the threshold score v at which the capped removed cost first reaches the
    budget (bisection over the sorted scores), removes every unit below v, and the units
    tied at v in the same proportion in every layer. Returns ``limit`` when the budget
    exceeds what the limits allow.
    """
    layers = range(len(scores))
    sorted_scores = [torch.sort(s.to(torch.float64)).values for s in scores]
    limit_t = torch.tensor([float(x) for x in limit], dtype=torch.float64)
    cost_t = torch.tensor([float(c) for c in unit_cost], dtype=torch.float64)
    if budget <= 0:
        return [0.0 for _ in layers]
    if float(limit_t.sum()) <= budget:
        return limit_t.tolist()
    values = torch.unique(torch.cat([s for s in sorted_scores if s.numel()]))  # ascending

    def removed(v: torch.Tensor, right: bool) -> torch.Tensor:
        counts = torch.tensor(
            [float(torch.searchsorted(s, v, right=right)) if s.numel() else 0.0 for s in sorted_scores],
            dtype=torch.float64,
        )
        return torch.minimum(counts * cost_t, limit_t)

    lo, hi = 0, values.numel() - 1  # smallest k with removed(values[k], right=True).sum() >= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if float(removed(values[mid], True).sum()) >= budget:
            hi = mid
        else:
            lo = mid + 1
    v = values[lo]
    below, upto = removed(v, False), removed(v, True)
    tied = upto - below
    remaining = budget - float(below.sum())
    share = remaining / float(tied.sum()) if float(tied.sum()) > 0 else 0.0
    return (below + share * tied).tolist()


def _attention_pool(importance: Importance, shape: ModelShape, unit: str) -> tuple[UnitPool, str]:
    """Attention units: channels/components when available and wanted, else query heads."""
    channels = getattr(importance, "attention_channels", None) or []
    use_channels = unit == "channel" and len(channels) == len(shape.layers)
    scores, costs = [], []
    for l, layer in enumerate(shape.layers):
        s = channels[l] if use_channels else importance.attention[l]
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        expected = {layer.num_heads, layer.num_heads * layer.v_dim}
        if s.numel() not in expected:
            raise ValueError(f"layer {l}: {s.numel()} attention scores for {layer.num_heads} heads of v_dim {layer.v_dim}")
        scores.append(s)
        costs.append(layer.attention_params / s.numel() if s.numel() else 0.0)
    return UnitPool(scores, costs, [float(l.attention_params) for l in shape.layers]), "channel" if use_channels else "head"


def _mlp_pool(importance: Importance, shape: ModelShape) -> UnitPool:
    scores, costs = [], []
    for l, layer in enumerate(shape.layers):
        s = torch.as_tensor(importance.mlp[l], dtype=torch.float64).reshape(-1)
        if s.numel() != layer.intermediate:
            raise ValueError(f"layer {l}: {s.numel()} FFN scores for intermediate size {layer.intermediate}")
        scores.append(s)
        costs.append(layer.mlp_params / s.numel() if s.numel() else 0.0)
    return UnitPool(scores, costs, [float(l.mlp_params) for l in shape.layers])


def _check_scores(pool: UnitPool, kind: str) -> None:
    for l, s in enumerate(pool.scores):
        if s.numel() and not bool(torch.isfinite(s).all()):
            raise FloatingPointError(f"non-finite {kind} importance in layer {l}")


def round_ffn_ratio(ratio: float, layer: LayerShape, cap: float, multiple: int) -> float:
    """The ratio whose kept channel count is a multiple of ``multiple`` (nearest), and
    never below the cap's minimum; unchanged when the width is not such a multiple."""
    inter = layer.intermediate
    if inter == 0 or multiple <= 1 or inter % multiple:
        return ratio
    kept = round_to_multiple(inter * (1.0 - ratio), multiple, inter, minimum=inter * (1.0 - cap))
    return 1.0 - kept / inter


def _ffn_step(layer: LayerShape, multiple: int) -> float:
    """The ratio change of keeping ``multiple`` channels more or fewer (1 channel when the
    width is not a multiple)."""
    if layer.intermediate == 0:
        return 0.0
    step = multiple if multiple > 1 and layer.intermediate % multiple == 0 else 1
    return step / layer.intermediate


def repair_ffn_rounding(
    ratios: list[float], wanted: list[float], shape: ModelShape, cap: float, multiple: int, low: float, high: float
) -> list[float]:
    """Move FFN layers by one rounding step until the FFN's removed parameters lie in
    [low, high] (what the attention can absorb), where the granularity allows.

    Rounding every layer to its nearest multiple can leave the FFN total where the
    attention cannot make up the difference (when the attention is capped, or has no
    budget left); the layers rounded furthest from their wanted ratio move first.
    """
    ratios = list(ratios)
    cost = [float(l.mlp_params) for l in shape.layers]
    removed = lambda: sum(r * c for r, c in zip(ratios, cost))
    for _ in range(sum(l.intermediate for l in shape.layers) + 1):
        total = removed()
        if total < low - 1e-9 * max(low, 1.0):
            room = [i for i, l in enumerate(shape.layers) if ratios[i] + _ffn_step(l, multiple) <= cap + 1e-12 and _ffn_step(l, multiple)]
            if not room:
                break
            i = max(room, key=lambda j: wanted[j] - ratios[j])
            ratios[i] += _ffn_step(shape.layers[i], multiple)
        elif total > high + 1e-9 * max(high, 1.0):
            room = [i for i, l in enumerate(shape.layers) if ratios[i] - _ffn_step(l, multiple) >= -1e-12 and _ffn_step(l, multiple)]
            if not room:
                break
            i = max(room, key=lambda j: ratios[j] - wanted[j])
            ratios[i] = max(0.0, ratios[i] - _ffn_step(shape.layers[i], multiple))
        else:
            break
    return ratios


def global_allocation(importance: Importance, target: float, shape: ModelShape, params: dict[str, Any]) -> Allocation:
    """See the module docstring."""
    lambda_b, cap = float(params["lambda_b"]), float(params["cap"])
    multiple, normalise = int(params["multiple"]), str(params["normalise"])
    if not 0.0 < cap <= 1.0:
        raise UsageError(f"cap must be in (0, 1], got {cap}")
    if lambda_b < 0:
        raise UsageError(f"lambda_b must be >= 0, got {lambda_b}")
    if str(params["attention_unit"]) not in ("channel", "head"):
        raise UsageError(f"attention_unit must be 'channel' or 'head', got {params['attention_unit']!r}")
    attn, unit = _attention_pool(importance, shape, str(params["attention_unit"]))
    mlp = _mlp_pool(importance, shape)
    _check_scores(attn, "attention")
    _check_scores(mlp, "FFN")

    total_attn, total_mlp = sum(attn.capacity), sum(mlp.capacity)
    budget = target * (total_attn + total_mlp)
    cap_attn = [cap * c if s.numel() else 0.0 for c, s in zip(attn.capacity, attn.scores)]
    cap_mlp = [cap * c if s.numel() else 0.0 for c, s in zip(mlp.capacity, mlp.scores)]
    low, high = max(0.0, budget - sum(cap_attn)), min(budget, sum(cap_mlp))
    if low > high + 1e-9 * max(budget, 1.0):
        raise UsageError(f"sparsity {target} cannot be met with a per-layer cap of {cap}")
    ffn_budget = min(max(lambda_b * target * total_mlp, low), high)

    removed_mlp = remove_lowest(mlp.ranking_scores(normalise), mlp.unit_cost, cap_mlp, ffn_budget)
    wanted = [r / c if c > 0 else 0.0 for r, c in zip(removed_mlp, mlp.capacity)]
    mlp_ratios = [round_ffn_ratio(w, layer, cap, multiple) for w, layer in zip(wanted, shape.layers)]
    mlp_ratios = repair_ffn_rounding(mlp_ratios, wanted, shape, cap, multiple, low, high)
    ffn_removed = sum(r * c for r, c in zip(mlp_ratios, mlp.capacity))
    attn_budget = min(max(budget - ffn_removed, 0.0), sum(cap_attn))
    removed_attn = remove_lowest(attn.ranking_scores(normalise), attn.unit_cost, cap_attn, attn_budget)
    attn_ratios = [r / c if c > 0 else 0.0 for r, c in zip(removed_attn, attn.capacity)]

    allocation = Allocation(attn_ratios, mlp_ratios)
    achieved = allocation.removed_params(shape)
    allocation.meta = {
        "rule": "global",
        "lambda_b": lambda_b,
        "cap": cap,
        "normalise": normalise,
        "attention_unit": unit,
        "multiple": multiple,
        "target_params": budget,
        "removed_params": achieved,
        "budget_error": (achieved - budget) / max(total_attn + total_mlp, 1.0),
        "attention_overall": sum(removed_attn) / max(total_attn, 1.0),
        "ffn_overall": ffn_removed / max(total_mlp, 1.0),
    }
    return allocation


class GlobalAllocation(Component):
    """Rank units across layers per module kind; FFN ratio lambda_b x target overall, attention absorbs the rest; per-layer cap."""

    kind, name = "allocation", "global"
    defaults: ClassVar[dict[str, Any]] = {"lambda_b": 1.0, "cap": 0.8, "multiple": 8, "normalise": "cost", "attention_unit": "channel"}

    @hookimpl
    def allocate_ratios(
        self, importance: Importance | None, target: float, shape: ModelShape, params: dict[str, Any]
    ) -> Allocation:
        if importance is None:
            raise UsageError(
                "the 'global' allocation needs importance scores: use an importance component "
                "such as mask-grad or mask-grad-pca (--set importance=mask-grad)"
            )
        return global_allocation(importance, target, shape, params)


@hookimpl
def prunebench_components() -> list[Component]:
    return [GlobalAllocation()]
