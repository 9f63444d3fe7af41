"""FLAP (An et al., AAAI 2024): fluctuation-based structured pruning with bias compensation.

Three components and a recipe, following CASIA-IVA-Lab/FLAP (``lib/prune.py``,
``lib/layerwrapper.py``):

* importance ``flap``: the fluctuation of each input channel j of ``o_proj`` and
  ``down_proj`` over the calibration tokens, measured on the DENSE model (as the
  reference does: it scores every layer before pruning any). The importance stage runs
  before the layer loop, so the hook propagates the calibration signals through the dense
  layers itself (``embed`` / ``run_layer`` with pre-hooks on the two projections) and
  accumulates streamed float64 moments. Metrics (``metric``):
  ``wifv`` (default) = Var(x_j) * ||W[:, j]||^2, ``ifv`` = Var(x_j),
  ``wifn`` = mean_i |W_ij| * sqrt(E x_j^2). Var is the unbiased sample variance over all
  calibration tokens. The attention metric is raised to ``attention_power`` (default 2):
  the reference squares it once more (``metrics[...] ** 2``) although the paper's formula
  does not; within one layer that changes no ranking, but it does change the z-scores and
  so the split between heads and channels in AL-AM. ``attention_power=1`` is the paper's
  formula. Scores are per o_proj input channel (``Importance.attention[l]`` has
  H * v_dim entries, documented departure from "one per head"); a head is the mean of its
  channels.
* allocation ``flap-al-am``: per layer and module the scores are standardised
  (z = (s - mean) / std over that layer's channels, the reference's ``standarlization``);
  a head's score is the mean of its channels' z; then heads and FFN channels of all layers
  are ranked together, descending, each weighted by its parameter cost, and the ranking is
  cut where the kept parameters are nearest (1 - target) of the decoder parameters.
  Costs: an FFN channel = its gate/up rows and down column; a query head = its q rows and
  o columns; its KV head's k/v rows are charged to the first (best-ranked) query head of
  its group, i.e. they are kept while any head of the group is kept. Because the kept set
  is a prefix of the ranking, that charge is exact, not an approximation; what is
  approximate is only that biases (and the compensation bias the FFN/attention add, d per
  module) are left out of the unit costs. For MHA Llama-7B this gives the reference's
  weight of a head, 4 * head_dim * d / (3 d) = 512/3 channels. The exact kept counts per
  layer are passed in ``Allocation.meta`` (``kept_heads``, ``kept_channels``) so the
  layer components keep exactly the ranked units; the ratios are the matching parameter
  fractions for any other component.
* attention / ffn ``flap``: keep the allocated heads / channels by score (the global
  scores when an importance is given, else WIFV measured in the layer loop), and add the
  bias compensation b = W_out[:, removed] @ mean(x_removed) to ``o_proj`` / ``down_proj``
  (added to any existing bias; ``compensate=false`` leaves it out, for ablations).
  ``metric`` is used only when no global scores are given; ``multiple`` rounds the FFN
  width only when no allocation passed exact counts. Departure: the mean is measured in the layer loop, on the
  inputs the pruned earlier layers produce, not on the dense model as the reference
  does, so the compensation matches the signal the pruned layer really sees. Removing
  heads or channels does not change the kept units' activations, so the compensated
  module's mean output over the calibration tokens equals the unpruned one exactly.

GQA: query heads are scored and removed individually; a KV head goes when its last
query head goes (``prunebench.harness.surgery.keep_heads``), and the allocation charges it so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from prunebench.harness.budget import AttentionCost, channels_to_keep, heads_to_keep
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext, RunContext, embed, run_layer
from prunebench.harness.contracts import (
    Allocation,
    AttentionPlan,
    ComponentRef,
    Importance,
    LayerShape,
    LinearWeights,
    MLPPlan,
    ModelShape,
    Recipe,
)
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.pruned_model import PrunedForCausalLM, effective_weight
from prunebench.harness.scores import wanda_channel_scores, weighted_energy
from prunebench.harness.stats import Moments
from prunebench.harness.surgery import attention_plan_of, keep_channels, keep_heads, mlp_plan_of

METRICS = ("wifv", "ifv", "wifn")


# ----- fluctuation metrics -------------------------------------------------------------
def channel_metric(metric: str, weight: torch.Tensor, stats: Moments) -> torch.Tensor:
    """The FLAP score of each input channel of a projection, in float64."""
    if metric == "wifv":
        return weighted_energy(weight, stats.variance)
    if metric == "ifv":
        return stats.variance.clone()
    if metric == "wifn":
        return wanda_channel_scores(weight, stats.second_moment)
    raise UsageError(f"unknown FLAP metric {metric!r}; valid: {', '.join(METRICS)}")


def _accumulate(found: dict[str, Moments], site: str) -> Callable[..., None]:
    """A forward pre-hook adding the module's input to ``found[site]`` (streamed moments)."""

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        if site not in found:
            found[site] = Moments.empty(x.shape[-1], False, x.device)
        found[site].update(x)

    return hook


@torch.no_grad()
def dense_input_moments(model: PrunedForCausalLM, calibration: torch.Tensor, batch_size: int,
                        device: torch.device) -> list[tuple[Moments, Moments]]:
    """Moments of the o_proj and down_proj inputs of every layer of the unpruned model.

    One pass per layer: the layer's calibration inputs go through it with pre-hooks on the
    two projections, and its outputs feed the next layer (the reference's dense sweep).
    """
    hidden = embed(model, calibration, batch_size, device)
    result = []
    for layer in model.model.layers:
        found: dict[str, Moments] = {}
        handles = [
            layer.self_attn.o_proj.register_forward_pre_hook(_accumulate(found, "o_in")),
            layer.mlp.down_proj.register_forward_pre_hook(_accumulate(found, "down_in")),
        ]
        try:
            hidden = run_layer(layer, model, hidden, batch_size)
        finally:
            for h in handles:
                h.remove()
        o_dim, down_dim = layer.self_attn.o_proj.in_features, layer.mlp.down_proj.in_features
        result.append((found.get("o_in") or Moments.empty(o_dim, False), found.get("down_in") or Moments.empty(down_dim, False)))
    return result


def head_scores(scores: torch.Tensor, num_heads: int, v_dim: int) -> torch.Tensor:
    """One score per query head from per-channel (H * v_dim) or per-head (H) scores."""
    scores = scores.to(torch.float64).reshape(-1)
    if scores.numel() == num_heads * v_dim and v_dim > 0:
        return scores.reshape(num_heads, v_dim).mean(1)
    if scores.numel() == num_heads:
        return scores
    raise ValueError(f"attention importance has {scores.numel()} entries; expected {num_heads} heads or {num_heads * v_dim} channels")


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std (unbiased, as torch.std in the reference); constant input -> zeros."""
    x = x.to(torch.float64)
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / std if float(std) > 0 else torch.zeros_like(x)


class FlapImportance(Component):
    """FLAP fluctuation scores (WIFV) of o_proj/down_proj input channels, on the dense model."""

    kind, name = "importance", "flap"
    defaults: ClassVar[dict[str, Any]] = {"metric": "wifv", "attention_power": 2.0}

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> Importance:
        metric = str(params["metric"]).lower()
        if metric not in METRICS:
            raise UsageError(f"unknown FLAP metric {metric!r}; valid: {', '.join(METRICS)}")
        power = float(params["attention_power"])
        moments = dense_input_moments(run.model, run.calibration, run.batch_size, run.device)
        attention, mlp = [], []
        for layer, (o_in, down_in) in zip(run.model.model.layers, moments):
            o_w, down_w = effective_weight(layer.self_attn.o_proj), effective_weight(layer.mlp.down_proj)
            attention.append(channel_metric(metric, o_w, o_in).pow(power).cpu())
            mlp.append(channel_metric(metric, down_w, down_in).cpu())
        return Importance(attention, mlp, meta={
            "metric": metric, "attention_power": power, "attention_unit": "o_proj input channel",
            "tokens": int(moments[0][1].count) if moments else 0,
        })


# ----- AL-AM allocation ----------------------------------------------------------------
def _unit_costs(layer: LayerShape) -> tuple[int, int, float]:
    """(query head: q rows + o columns, its KV head: k + v rows, FFN channel) in parameters."""
    cost = AttentionCost.of_shape(layer)
    return cost.query_head, cost.kv_head, 3 * layer.hidden


def _group_of(layer: LayerShape) -> list[int]:
    """The KV head of each query head, assuming the stock contiguous groups of the shape."""
    h, g = layer.num_heads, max(layer.num_kv_heads, 1)
    if h % g:
        raise UsageError(f"flap-al-am needs equal GQA groups in the shape ({h} heads, {g} KV heads)")
    return [i // (h // g) for i in range(h)]


class FlapAllocation(Component):
    """FLAP's AL-AM: z-scores per layer and module, one global cost-weighted ranking of
    heads and FFN channels, cut at the parameter budget."""

    kind, name = "allocation", "flap-al-am"
    defaults: ClassVar[dict[str, Any]] = {}

    @hookimpl
    def allocate_ratios(self, importance: Importance | None, target: float, shape: ModelShape,
                        params: dict[str, Any]) -> Allocation:
        if importance is None:
            raise UsageError("flap-al-am ranks units globally and needs importance scores (importance=flap)")
        units = []  # (z, layer, is_head, index, cost, kv group or -1)
        fixed = shape.decoder_params
        for l, (layer, a, m) in enumerate(zip(shape.layers, importance.attention, importance.mlp)):
            head_cost, kv_cost, ch_cost = _unit_costs(layer)
            if layer.num_heads:
                a = a.to(torch.float64).reshape(-1)
                z = head_scores(standardise(a), layer.num_heads, layer.v_dim)
                for h, (score, g) in enumerate(zip(z.tolist(), _group_of(layer))):
                    units.append((score, l, True, h, head_cost, g))
                fixed -= layer.num_heads * head_cost + layer.num_kv_heads * kv_cost
            if layer.intermediate:
                z = standardise(m.reshape(-1))
                if z.numel() != layer.intermediate:
                    raise ValueError(f"layer {l}: {z.numel()} FFN scores for {layer.intermediate} channels")
                units += [(s, l, False, j, ch_cost, -1) for j, s in enumerate(z.tolist())]
                fixed -= layer.intermediate * ch_cost
        order = sorted(range(len(units)), key=lambda i: -units[i][0])  # stable: ties keep layer order
        budget = (1.0 - float(target)) * shape.decoder_params - fixed
        kept_cost, seen, best_n, best_gap = 0.0, set(), 0, abs(budget)
        for n, i in enumerate(order, start=1):
            _, l, is_head, _, cost, g = units[i]
            kept_cost += cost
            if is_head and (l, g) not in seen:
                seen.add((l, g))
                kept_cost += _unit_costs(shape.layers[l])[1]
            if abs(kept_cost - budget) < best_gap:
                best_n, best_gap = n, abs(kept_cost - budget)
        return _allocation_from(units, order[:best_n], shape, float(target))


def _allocation_from(units: list[tuple], kept: list[int], shape: ModelShape, target: float) -> Allocation:
    """Per-layer kept counts and the parameter fractions they remove."""
    n = len(shape.layers)
    heads = [0] * n
    channels = [0] * n
    groups: list[set[int]] = [set() for _ in range(n)]
    for i in kept:
        _, l, is_head, _, _, g = units[i]
        if is_head:
            heads[l] += 1
            groups[l].add(g)
        else:
            channels[l] += 1
    att, mlp = [], []
    for l, layer in enumerate(shape.layers):
        head_cost, kv_cost, ch_cost = _unit_costs(layer)
        removed_att = (layer.num_heads - heads[l]) * head_cost + (layer.num_kv_heads - len(groups[l])) * kv_cost
        removed_mlp = (layer.intermediate - channels[l]) * ch_cost
        att.append(min(1.0, removed_att / layer.attention_params) if layer.attention_params else 0.0)
        mlp.append(min(1.0, removed_mlp / layer.mlp_params) if layer.mlp_params else 0.0)
    return Allocation(att, mlp, meta={
        "rule": "flap-al-am", "target": target, "kept_heads": heads, "kept_channels": channels,
    })


# ----- layer components ----------------------------------------------------------------
def _allocated(layer: LayerContext, key: str) -> int | None:
    counts = layer.allocation.meta.get(key) if layer.allocation is not None else None
    return None if counts is None else int(counts[layer.index])


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores.to(torch.float64), descending=True, stable=True)[:k].tolist())


def compensated(w: LinearWeights, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Existing bias + W[:, removed] @ mean[removed]: the removed inputs' mean contribution."""
    weight = w.weight.to(torch.float64)
    extra = weight[:, removed] @ mean.to(torch.float64)[removed]
    base = torch.zeros_like(extra) if w.bias is None else w.bias.to(torch.float64)
    return (base + extra).to(w.weight.dtype)


class FlapAttention(Component):
    """Keep the allocated query heads by FLAP score; fold the removed heads' mean output into
    an o_proj bias."""

    kind, name = "attention", "flap"
    defaults: ClassVar[dict[str, Any]] = {"metric": "wifv", "compensate": True}

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        attn = layer.layer.self_attn
        count = _allocated(layer, "kept_heads")
        if attn.num_heads == 0 or (count is None and ratio <= 0) or count == attn.num_heads:
            return None
        stats = layer.collect(["o_in"])["o_in"]
        plan = attention_plan_of(attn)
        if plan.o.weight is None:
            raise UsageError("flap attention needs a dense o_proj")
        if layer.importance is not None:
            scores = head_scores(layer.importance.attention[layer.index], attn.num_heads, attn.v_dim)
        else:
            channel = channel_metric(str(params["metric"]).lower(), plan.o.weight, stats)
            scores = head_scores(channel, attn.num_heads, attn.v_dim)
        kept = heads_to_keep(plan, scores, ratio) if count is None else _top(scores, count)
        removed_heads = [h for h in range(attn.num_heads) if h not in set(kept)]
        removed = (torch.as_tensor(removed_heads, dtype=torch.long)[:, None] * attn.v_dim + torch.arange(attn.v_dim)).reshape(-1)
        bias = compensated(plan.o, removed, stats.mean.to(plan.o.weight.device))
        new = keep_heads(plan, kept)
        if params["compensate"]:
            new.o = LinearWeights(weight=new.o.weight, bias=bias)
        new.summary = {"kept_heads": kept, "num_kv_heads": new.num_kv_heads}
        return new


class FlapFFN(Component):
    """Keep the allocated FFN channels by FLAP score; fold the removed channels' mean
    contribution into a down_proj bias."""

    kind, name = "ffn", "flap"
    defaults: ClassVar[dict[str, Any]] = {"metric": "wifv", "multiple": 1, "compensate": True}

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
        mlp = layer.layer.mlp
        count = _allocated(layer, "kept_channels")
        if mlp.intermediate == 0 or (count is None and ratio <= 0) or count == mlp.intermediate:
            return None
        stats = layer.collect(["down_in"])["down_in"]
        plan = mlp_plan_of(mlp)
        if plan.down.weight is None:
            raise UsageError("flap ffn needs a dense down_proj")
        if layer.importance is not None:
            scores = layer.importance.mlp[layer.index].to(torch.float64)
        else:
            scores = channel_metric(str(params["metric"]).lower(), plan.down.weight, stats)
        k = channels_to_keep(plan, ratio, int(params["multiple"])) if count is None else count
        kept = _top(scores, k)
        removed = torch.as_tensor(sorted(set(range(mlp.intermediate)) - set(kept)), dtype=torch.long)
        bias = compensated(plan.down, removed, stats.mean.to(plan.down.weight.device))
        new = keep_channels(plan, kept)
        if params["compensate"]:
            new.down = LinearWeights(weight=new.down.weight, bias=bias)
        new.summary = {"intermediate": len(kept)}
        return new


@hookimpl
def prunebench_components() -> list[Component]:
    return [FlapImportance(), FlapAllocation(), FlapAttention(), FlapFFN()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "flap",
            {
                "importance": ComponentRef("flap"),
                "allocation": ComponentRef("flap-al-am"),
                "attention": ComponentRef("flap"),
                "ffn": ComponentRef("flap"),
            },
            "FLAP (An et al. 2024): WIFV fluctuation, AL-AM global structure, bias compensation.",
        )
    ]
