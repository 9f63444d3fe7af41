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

``selection="reference"`` is the authors' ``search_param_pca`` + ``recorrect_prune_rate``
(the ``intraslice`` recipe's): whole query heads and FFN neurons, ranked by raw score
across layers (most important first; equal scores in turn over the layers). The FFN
keeps int(N_I * (1 - lambda_b * t)) neurons (N_I: all layers' neurons); the heads get the
rest of the kept parameters, (1 - t) * P minus the kept neurons' cost, at the fractional
per-head cost attention_params / heads (q + o + (G/N) * (k + v), biases included: the
reference's q + o + 2 (G/N) D d), as many as fit in rank order. A layer's ratios are the
fractions of its heads and neurons removed; then every ratio above ``cap`` is set to it
and the excess spread over the ratios strictly between 0 and the cap, largest first, in
proportion to their values and at most up to the cap (what none can take is lost). With
the fractional head cost a head fraction is a fraction of the attention's parameters, so
``Allocation.removed_params`` is t * P within one head and one neuron (before the cap;
the re-spread conserves the sum of ratios, i.e. the parameters when layers are equal).
``normalise``, ``attention_unit`` and ``multiple`` do not apply (the FFN component rounds
its kept width itself). The reference ranks units by ``torch.sort``, so its tie order is
arbitrary; its ratio columns are "unit-count fractions" as here.

Departures from the reference (``selection="project"``): caps inside the selection (above); the cost
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


# ----- selection="reference": whole units by raw score, counts, then the cap's re-spread -------------
def _head_scores(importance: Importance, shape: ModelShape) -> list[torch.Tensor]:
    """One raw score per query head and layer (channel scores are summed per head)."""
    out = []
    for l, layer in enumerate(shape.layers):
        s = torch.as_tensor(importance.attention[l], dtype=torch.float64).reshape(-1)
        if s.numel() == layer.num_heads * layer.v_dim and layer.v_dim > 1:
            s = s.reshape(layer.num_heads, -1).sum(1)
        if s.numel() != layer.num_heads:
            raise ValueError(f"layer {l}: {s.numel()} attention scores for {layer.num_heads} heads")
        out.append(s)
    return out


def ranked_layers(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The layer of every unit of all layers, most important unit first: by raw score
    descending; equal scores in turn over the layers (by the unit's rank inside its layer,
    then the layer), so equal importances are spread evenly."""
    layer = torch.cat([torch.full((s.numel(),), l, dtype=torch.long) for l, s in enumerate(scores)])
    rank = torch.cat([torch.argsort(torch.argsort(s, descending=True, stable=True), stable=True) for s in scores])
    value = torch.cat([s.to(torch.float64) for s in scores])
    order = torch.arange(value.numel())
    for key in (rank, -value):  # stable sorts: the last key is the primary one
        order = order[torch.argsort(key[order], stable=True)]
    return layer[order]


def respread_cap(ratios: Sequence[float], cap: float, tol: float = 1e-6) -> list[float]:
    """The reference's cap (``recorrect_prune_rate``): ratios above ``cap`` are set to it,
    and their excess is spread over the entries strictly between 0 and ``cap``, largest
    first, each getting rem * v_i / (sum of v_i and the smaller ones), at most up to the
    cap; what no entry can take is lost."""
    out = [float(r) for r in ratios]
    excess = sum(r - cap for r in out if r > cap)
    out = [min(r, cap) for r in out]
    if excess <= tol:
        return out
    eligible = sorted((i for i, r in enumerate(out) if 0.0 < r < cap), key=lambda i: -out[i])
    values = [out[i] for i in eligible]
    rem = excess
    for pos, i in enumerate(eligible):
        tail = sum(values[pos:])
        add = min(rem * values[pos] / tail, cap - values[pos]) if tail > 0 else 0.0
        out[i] = values[pos] + add
        rem -= add
        if rem <= tol:
            break
    return out


def _keep_within(costs: torch.Tensor, budget: float) -> int:
    """How many units, in ranked order, fit in ``budget`` parameters (the first that does
    not fit stops the count)."""
    if budget <= 0 or costs.numel() == 0:
        return 0
    return int(torch.searchsorted(torch.cumsum(costs, 0), torch.tensor(budget + 1e-6, dtype=torch.float64), right=True))


def reference_allocation(importance: Importance, target: float, shape: ModelShape, params: dict[str, Any]) -> Allocation:
    """The authors' ``search_param_pca`` with ``recorrect_prune_rate`` (module docstring)."""
    lambda_b, cap = float(params["lambda_b"]), float(params["cap"])
    heads = _head_scores(importance, shape)
    mlp = _mlp_pool(importance, shape).scores
    for kind, pool in (("attention", heads), ("FFN", mlp)):
        _check_scores(UnitPool(pool, [], []), kind)
    head_cost = [l.attention_params / l.num_heads if l.num_heads else 0.0 for l in shape.layers]
    neuron_cost = [l.mlp_params / l.intermediate if l.intermediate else 0.0 for l in shape.layers]
    total = float(shape.decoder_params)
    max_param = (1.0 - target) * total
    neurons = sum(l.intermediate for l in shape.layers)
    n_neurons = min(max(int(neurons * (1.0 - target * lambda_b)), 0), neurons)
    n_layer = ranked_layers(mlp)
    kept_mlp = [0] * len(shape.layers)
    for l in n_layer[:n_neurons].tolist():
        kept_mlp[l] += 1
    room = max_param - sum(k * c for k, c in zip(kept_mlp, neuron_cost))
    h_layer = ranked_layers(heads)
    costs = torch.tensor([head_cost[l] for l in h_layer.tolist()], dtype=torch.float64)
    n_heads = _keep_within(costs, room)
    kept_heads = [0] * len(shape.layers)
    for l in h_layer[:n_heads].tolist():
        kept_heads[l] += 1
    attn = [1.0 - k / l.num_heads if l.num_heads else 0.0 for k, l in zip(kept_heads, shape.layers)]
    ffn = [1.0 - k / l.intermediate if l.intermediate else 0.0 for k, l in zip(kept_mlp, shape.layers)]
    allocation = Allocation(respread_cap(attn, cap), respread_cap(ffn, cap))
    achieved = allocation.removed_params(shape)
    allocation.meta = {
        "rule": "global",
        "selection": "reference",
        "lambda_b": lambda_b,
        "cap": cap,
        "kept_heads": n_heads,
        "kept_neurons": n_neurons,
        "uncapped_attention": attn,
        "uncapped_ffn": ffn,
        "target_params": target * total,
        "removed_params": achieved,
        "budget_error": (achieved - target * total) / max(total, 1.0),
    }
    return allocation


def global_allocation(importance: Importance, target: float, shape: ModelShape, params: dict[str, Any]) -> Allocation:
    """See the module docstring."""
    if str(params.get("selection", "project")) not in ("project", "reference"):
        raise UsageError(f"selection must be 'project' or 'reference', got {params['selection']!r}")
    if params.get("selection", "project") == "reference":
        if not 0.0 < float(params["cap"]) <= 1.0:
            raise UsageError(f"cap must be in (0, 1], got {params['cap']}")
        return reference_allocation(importance, target, shape, params)
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
    defaults: ClassVar[dict[str, Any]] = {
        "lambda_b": 1.0,
        "cap": 0.8,
        "multiple": 8,
        "normalise": "cost",
        "attention_unit": "channel",
        "selection": "project",  # "project" (above) or "reference" (whole units by raw score, counts, cap re-spread)
    }

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
