"""Turning a layer's ratio into unit counts: how many heads or channels meet the budget.

Shared by every method that removes whole units, so "30% of this layer's attention"
means the same number of parameters whichever method prunes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunebench.harness.contracts import AttentionPlan, LinearWeights, MLPPlan


def _bias(w: LinearWeights) -> int:
    return 0 if w.bias is None else 1


def attention_cost(plan: AttentionPlan, heads: Sequence[int]) -> int:
    """Parameters of ``plan`` after keeping only ``heads`` (dense projections assumed)."""
    d = plan.q.in_features
    kv = {plan.head_to_kv[h] for h in heads}
    q = len(heads) * plan.qk_dim * (d + _bias(plan.q))
    k = len(kv) * plan.qk_dim * (d + _bias(plan.k))
    v = len(kv) * plan.v_dim * (d + _bias(plan.v))
    o = len(heads) * plan.v_dim * d + (plan.o.out_features if plan.o.bias is not None else 0)
    return q + k + v + o


def plan_params(plan: AttentionPlan | MLPPlan) -> int:
    """Parameters of a plan as it stands (every projection, any form)."""
    if isinstance(plan, AttentionPlan):
        parts = (plan.q, plan.k, plan.v, plan.o)
    else:
        parts = (plan.gate, plan.up, plan.down) + ((plan.branch,) if plan.branch is not None else ())
    return sum(w.num_params() for w in parts)


def heads_to_keep(plan: AttentionPlan, scores: torch.Tensor, ratio: float) -> list[int]:
    """Drop the lowest-scoring query heads one by one and return the kept set whose
    parameter count is nearest to ``(1 - ratio)`` of the current count (KV heads go with
    their last query head, which the cost accounts for)."""
    heads = list(range(len(plan.head_to_kv)))
    budget = (1.0 - ratio) * attention_cost(plan, heads)
    order = torch.argsort(scores.to(torch.float64), stable=True).tolist()  # ascending: least important first
    best, best_gap = list(heads), abs(attention_cost(plan, heads) - budget)
    kept = set(heads)
    for h in order:
        kept.discard(h)
        gap = abs(attention_cost(plan, sorted(kept)) - budget)
        if gap < best_gap:
            best, best_gap = sorted(kept), gap
    return best


def channels_to_keep(plan: MLPPlan, ratio: float, multiple: int = 8) -> int:
    """How many FFN channels keep ``(1 - ratio)`` of the FFN's parameters, rounded to a
    multiple of ``multiple`` when the width allows (hardware-friendly sizes)."""
    inter = plan.intermediate
    if inter == 0:
        return 0
    per_channel = plan_params(MLPPlan(plan.gate, plan.up, plan.down)) / inter
    fixed = plan_params(plan) - per_channel * inter  # the branch, if any
    target = ((1.0 - ratio) * plan_params(plan) - fixed) / per_channel
    if multiple > 1 and inter % multiple == 0:
        return int(min(inter, max(0, round(target / multiple) * multiple)))
    return int(min(inter, max(0, round(target))))
