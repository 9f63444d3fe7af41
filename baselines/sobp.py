"""SoBP-style structured pruning (Wei et al., EMNLP 2024; no official code).

Two stages, as in the paper:

* Global: first-order importance of every head and FFN neuron (mask gradients: the
  ``mask-grad`` importance component) and an allocation of how many heads and neurons
  each layer keeps under the parameter budget. SoBP's allocation differs from the
  project's ``global`` allocator, so it is implemented here as ``sobp-global``:
  one joint knapsack over heads and neurons of all layers (in the manner of Kwon et al.
  2022's mask search): units are ranked by importance, heads and neurons separately; for
  every number of kept heads the rest of the budget is filled with the best neurons, and
  the split with the largest kept importance wins. A head costs its share of the layer's
  attention parameters (2 d h + 2 (kv / H) d h without biases: q and o rows are its own,
  k and v are shared by the H / kv heads of its group), a neuron its share of the MLP
  (3 d). Every layer keeps at least ``min_keep`` (20%) of its heads and of its neurons.
  ``global`` instead splits the budget between attention and FFN by a fixed bias
  lambda_b and ranks each kind on its own.
* Local (the ``sobp`` attention and FFN components): structured Optimal Brain Surgeon on
  the module's output projection, o_proj for heads and down_proj for neurons. With X the
  projection's inputs, H = 2 X^T X / n (float64) + 1% damping (relative to mean(diag H)),
  H^-1 by Cholesky. A unit (column set S of W) costs
  tr(W_S (H^-1_SS)^-1 W_S^T) of output error when removed with the optimal update of the
  remaining columns, W <- W - W_S (H^-1_SS)^-1 H^-1_{S,:}; for one column this is
  ||W[:, j]||^2 / [H^-1]_jj. Units are removed greedily, one at a time, re-scoring after
  each update (H^-1 restricted to the remaining columns is updated with the same
  Schur-complement step). Heads are blocks of v_dim columns.

How many units go: the layer's ratio (from the allocation) through the shared budget
helpers, so GQA's KV heads are costed exactly (a KV head goes with its last query head).
For heads, the greedy order is computed over all heads and handed to
``prunebench.harness.budget.heads_to_keep`` as the ranking; the final update is the block OBS update
for the whole removed set from the original weights, which equals the sequential greedy
updates (OBS removals compose).

Recipe ``sobp-exact`` (called ``sobp`` before 0.2; the old name still works with a
deprecation message): importance ``mask-grad`` + allocation ``sobp-global`` + attention and FFN
``sobp``; ``--set importance=none --set allocation=uniform`` gives the local step alone
at a uniform ratio (the ablation of the global stage). ``mask-grad`` scores a head as the sum of its o_proj channels' squared mask gradients,
not the squared gradient of one head mask (Kwon et al.'s Fisher); ``sobp-global`` takes
either (per-channel scores are summed per head).

Departure: the paper reconstructs each module after selection ("module-wise
reconstruction"); here the OBS update itself is that reconstruction (it is the
least-squares optimum of the kept columns for the module's output on the calibration
data, up to damping), with no further fitting step.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from prunebench.harness.budget import channels_to_keep, heads_to_keep
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext
from prunebench.harness.contracts import (
    Allocation,
    AttentionPlan,
    ComponentRef,
    Importance,
    LinearWeights,
    MLPPlan,
    ModelShape,
    Recipe,
)
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.obs import greedy_channels
from prunebench.harness.scores import head_scores
from prunebench.harness.stats import Moments, solve_psd
from prunebench.harness.surgery import attention_plan_of, keep_channels, keep_heads, mlp_plan_of


# ----- local structured OBS -----------------------------------------------------------------
def obs_inverse_hessian(stats: Moments, damping: float) -> torch.Tensor:
    """H^-1 for H = 2 X^T X / n (+ damping * mean(diag) I), float64, with solve_psd's fallback."""
    h = 2.0 * stats.gram.to(torch.float64) / max(stats.count, 1)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = solve_psd(h, eye, damping)
    return 0.5 * (hinv + hinv.T)


def block_scores(weight: torch.Tensor, hinv: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """tr(W_S (H^-1_SS)^-1 W_S^T) for each column set S (the OBS error of removing S)."""
    out = torch.empty(len(groups), dtype=torch.float64)
    for i, g in enumerate(groups):
        w = weight[:, g]
        out[i] = (w * torch.linalg.solve(hinv[g][:, g], w.T).T).sum()
    return out


def obs_remove(weight: torch.Tensor, hinv: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the columns ``removed`` with the OBS update of the others.

    Returns the updated W (removed columns become 0) and H^-1 of the remaining columns
    (embedded in the full matrix; removed rows/columns become 0).
    """
    if removed.numel() == 0:
        return weight, hinv
    block = hinv[removed][:, removed]
    rows = hinv[removed]  # [|S|, n]
    gain = torch.linalg.solve(block, rows)  # (H^-1_SS)^-1 H^-1_{S,:}
    new_w = weight - weight[:, removed] @ gain
    new_h = hinv - rows.T @ gain
    new_w[:, removed] = 0.0
    new_h[removed] = 0.0
    new_h[:, removed] = 0.0
    return new_w, new_h


def greedy_block_order(weight: torch.Tensor, hinv: torch.Tensor, groups: list[torch.Tensor], count: int) -> list[int]:
    """The order in which ``count`` column groups (heads) would be removed greedily by
    their block OBS error, each removal updating W and H^-1 before the next score."""
    w, h = weight.clone(), hinv.clone()
    alive = list(range(len(groups)))
    order: list[int] = []
    for _ in range(min(count, len(groups))):
        scores = block_scores(w, h, [groups[i] for i in alive])
        pick = alive.pop(int(torch.argmin(scores)))
        order.append(pick)
        w, h = obs_remove(w, h, groups[pick])
    return order


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X^T||_F^2 = tr((W - W') X^T X (W - W')^T) from the Gram matrix."""
    d = (weight - new_weight).to(torch.float64)
    return float((d @ gram.to(torch.float64) * d).sum())


def obs_prune_channels(plan: MLPPlan, hinv: torch.Tensor, keep: int) -> tuple[MLPPlan, torch.Tensor]:
    """Keep ``keep`` FFN channels, removing the others greedily by OBS error on down_proj
    with the OBS update of the kept columns; returns the plan and the kept channels."""
    inter = plan.intermediate
    removed, new_w = greedy_channels(plan.down.weight.to(torch.float64), hinv, inter - keep)
    mask = torch.ones(inter, dtype=torch.bool)
    mask[removed] = False
    kept = mask.nonzero().flatten()
    updated = replace(plan, down=LinearWeights(weight=new_w.to(plan.down.weight.dtype), bias=plan.down.bias))
    return keep_channels(updated, kept), kept


# ----- components -------------------------------------------------------------------------
class SobpAttention(Component):
    """SoBP local step: remove query heads greedily by block OBS error on o_proj, update o_proj."""

    kind, name = "attention", "sobp"
    defaults = {"damping": 0.01}

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        attn = layer.layer.self_attn
        if ratio <= 0 or attn.num_heads == 0:
            return None
        plan = attention_plan_of(attn)
        if plan.o.weight is None:
            raise UsageError("sobp needs a dense o_proj (this layer's o_proj is a factor pair)")
        stats = layer.collect({"o_in": True})["o_in"]
        hinv = obs_inverse_hessian(stats, float(params["damping"]))
        w = plan.o.weight.to(torch.float64)
        v = attn.v_dim
        groups = [torch.arange(h * v, (h + 1) * v) for h in range(attn.num_heads)]
        order = greedy_block_order(w, hinv, groups, attn.num_heads - 1)
        rank = torch.full((attn.num_heads,), float(attn.num_heads))
        for position, head in enumerate(order):
            rank[head] = float(position)  # removed earlier = less important
        kept = heads_to_keep(plan, rank, ratio)
        removed = [h for h in range(attn.num_heads) if h not in set(kept)]
        if not removed:
            return None
        cols = torch.cat([groups[h] for h in removed])
        new_w, _ = obs_remove(w, hinv, cols)
        plan.o = LinearWeights(weight=new_w.to(plan.o.weight.dtype), bias=plan.o.bias)
        new = keep_heads(plan, kept)
        new.summary = {"kept_heads": kept, "num_kv_heads": new.num_kv_heads, "removal_order": order}
        return new


class SobpFFN(Component):
    """SoBP local step: remove FFN neurons greedily by OBS error on down_proj, update down_proj."""

    kind, name = "ffn", "sobp"
    defaults = {"damping": 0.01, "multiple": 8}

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
        mlp = layer.layer.mlp
        if ratio <= 0 or mlp.intermediate == 0:
            return None
        plan = mlp_plan_of(mlp)
        if plan.down.weight is None:
            raise UsageError("sobp needs a dense down_proj (this layer's down_proj is a factor pair)")
        keep = channels_to_keep(plan, ratio, int(params["multiple"]))
        if keep >= mlp.intermediate:
            return None
        stats = layer.collect({"down_in": True})["down_in"]
        new, _ = obs_prune_channels(plan, obs_inverse_hessian(stats, float(params["damping"])), keep)
        new.summary = {"intermediate": keep}
        return new


# ----- SoBP's global allocation ---------------------------------------------------------------
def _forced(scores: torch.Tensor, minimum: int) -> torch.Tensor:
    """Mask of the ``minimum`` best units of one layer (always kept)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if minimum:
        mask[torch.argsort(scores, descending=True, stable=True)[:minimum]] = True
    return mask


def sobp_allocation(importance: Importance, target: float, shape: ModelShape, min_keep: float = 0.2) -> Allocation:
    """SoBP's joint head/neuron allocation under the decoder parameter budget (see module doc)."""
    layers = shape.layers
    if len(importance.attention) != len(layers) or len(importance.mlp) != len(layers):
        raise ValueError("importance must have one attention and one mlp score vector per layer")
    head_cost = [l.attention_params / l.num_heads if l.num_heads else 0.0 for l in layers]
    neuron_cost = [l.mlp_params / l.intermediate if l.intermediate else 0.0 for l in layers]
    h_scores = [head_scores(importance.attention[i], l.num_heads) for i, l in enumerate(layers)]
    n_scores = [importance.mlp[i].detach().to(torch.float64).flatten() for i in range(len(layers))]
    for i, l in enumerate(layers):
        if n_scores[i].numel() != l.intermediate:
            raise ValueError(f"layer {i}: mlp importance has {n_scores[i].numel()} scores for {l.intermediate} channels")

    budget = (1.0 - target) * shape.decoder_params
    forced_h = [_forced(s, math.ceil(min_keep * l.num_heads)) for s, l in zip(h_scores, layers)]
    forced_n = [_forced(s, math.ceil(min_keep * l.intermediate)) for s, l in zip(n_scores, layers)]
    fixed = sum(f.sum().item() * c for f, c in zip(forced_h, head_cost))
    fixed += sum(f.sum().item() * c for f, c in zip(forced_n, neuron_cost))

    def candidates(scores: list[torch.Tensor], forced: list[torch.Tensor], cost: list[float]):
        layer_of = torch.cat([torch.full((int((~f).sum()),), i, dtype=torch.long) for i, f in enumerate(forced)])
        s = torch.cat([sc[~f] for sc, f in zip(scores, forced)])
        c = torch.as_tensor([cost[i] for i in layer_of.tolist()], dtype=torch.float64)
        order = torch.argsort(s, descending=True, stable=True)
        zero = torch.zeros(1, dtype=torch.float64)
        return layer_of[order], torch.cat((zero, s[order].cumsum(0))), torch.cat((zero, c[order].cumsum(0)))

    h_layer, h_gain, h_cost = candidates(h_scores, forced_h, head_cost)
    n_layer, n_gain, n_cost = candidates(n_scores, forced_n, neuron_cost)
    room = budget - fixed
    best = (-math.inf, 0, 0)
    for nh in range(h_gain.numel()):
        left = room - float(h_cost[nh])
        if left < -1e-9:
            break
        nn_ = int(torch.searchsorted(n_cost, torch.tensor([left + 1e-9], dtype=torch.float64), right=True)) - 1
        total = float(h_gain[nh] + n_gain[nn_])
        if total > best[0]:
            best = (total, nh, nn_)
    _, nh, nn_ = best
    kept_h = [int(f.sum()) for f in forced_h]
    kept_n = [int(f.sum()) for f in forced_n]
    for i in h_layer[:nh].tolist():
        kept_h[i] += 1
    for i in n_layer[:nn_].tolist():
        kept_n[i] += 1
    attention = [1.0 - kh / l.num_heads if l.num_heads else 0.0 for kh, l in zip(kept_h, layers)]
    mlp = [1.0 - kn / l.intermediate if l.intermediate else 0.0 for kn, l in zip(kept_n, layers)]
    return Allocation(
        attention,
        mlp,
        meta={
            "rule": "sobp-global",
            "min_keep": min_keep,
            "kept_heads": kept_h,
            "kept_neurons": kept_n,
            "budget_met": room >= 0,
        },
    )


class SobpGlobalAllocation(Component):
    """SoBP's allocation: joint knapsack of heads and neurons by importance, >= 20% kept per layer."""

    kind, name = "allocation", "sobp-global"
    defaults = {"min_keep": 0.2}

    @hookimpl
    def allocate_ratios(
        self, importance: Importance | None, target: float, shape: ModelShape, params: dict[str, Any]
    ) -> Allocation:
        if importance is None:
            raise UsageError("sobp-global needs global importance scores (e.g. importance=mask-grad)")
        return sobp_allocation(importance, target, shape, float(params["min_keep"]))


@hookimpl
def prunebench_components() -> list[Component]:
    return [SobpAttention(), SobpFFN(), SobpGlobalAllocation()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "sobp-exact",
            {
                "importance": ComponentRef("mask-grad"),
                "allocation": ComponentRef("sobp-global"),
                "attention": ComponentRef("sobp"),
                "ffn": ComponentRef("sobp"),
            },
            "SoBP-style (Wei et al. 2024): mask-gradient importance, joint head/neuron allocation, local structured OBS.",
            aliases=("sobp",),
        )
    ]
