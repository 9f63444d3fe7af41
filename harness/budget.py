"""Parameter costs, and turning a layer's ratio into unit counts.

The one cost model of an attention (``AttentionCost``) and the one rounding rule of FFN
widths (``round_to_multiple``) live here, shared by every method, so "30% of this layer's
attention" means the same number of parameters whichever method prunes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunebench.harness.contracts import AttentionPlan, LayerShape, LinearWeights, MLPPlan


def _bias(w: LinearWeights) -> int:
    return 0 if w.bias is None else 1


@dataclass(frozen=True)
class AttentionCost:
    """Parameters of one layer's attention as a function of its kept units.

    With H query heads, G KV heads, c q/k channels and p v/o channels per head (dense
    projections), the attention holds ``c * per_qk_channel(H, G) + p * per_vo_channel(H, G)
    + fixed`` parameters: q rows and o columns belong to a query head, k and v rows to its
    KV head (shared by the group; a KV head goes with its last query head).
    """

    hidden: int
    qk_dim: int
    v_dim: int
    pairs: int = 0  # rotary pairs of a q/k head (the rest of qk_dim are pass-through channels)
    bias_q: int = 0
    bias_k: int = 0
    bias_v: int = 0
    bias_o: int = 0

    @classmethod
    def of_plan(cls, plan: AttentionPlan) -> AttentionCost:
        return cls(
            hidden=plan.q.in_features, qk_dim=plan.qk_dim, v_dim=plan.v_dim,
            pairs=int(plan.rope_index.shape[1]) if plan.rope_index.ndim == 2 else 0,
            bias_q=_bias(plan.q), bias_k=_bias(plan.k), bias_v=_bias(plan.v), bias_o=_bias(plan.o),
        )

    @classmethod
    def of_shape(cls, layer: LayerShape) -> AttentionCost:
        """From a ``LayerShape`` (no bias information there: biases count as absent)."""
        return cls(hidden=layer.hidden, qk_dim=layer.qk_dim, v_dim=layer.v_dim)

    @property
    def pass_dim(self) -> int:
        return self.qk_dim - 2 * self.pairs

    def per_qk_channel(self, heads: int, kv_heads: int) -> int:
        return heads * (self.hidden + self.bias_q) + kv_heads * (self.hidden + self.bias_k)

    def per_vo_channel(self, heads: int, kv_heads: int) -> int:
        return kv_heads * (self.hidden + self.bias_v) + heads * self.hidden

    @property
    def fixed(self) -> int:
        return self.hidden * self.bias_o

    def cost(self, heads: int, kv_heads: int, c: int | None = None, p: int | None = None) -> int:
        """Parameters with these counts and per-head dims (default: the current dims)."""
        c = self.qk_dim if c is None else c
        p = self.v_dim if p is None else p
        return c * self.per_qk_channel(heads, kv_heads) + p * self.per_vo_channel(heads, kv_heads) + self.fixed

    @property
    def query_head(self) -> int:
        """What one query head owns at the current dims: its q rows and o columns."""
        return self.qk_dim * (self.hidden + self.bias_q) + self.v_dim * self.hidden

    @property
    def kv_head(self) -> int:
        """What one KV head owns at the current dims: its k and v rows."""
        return self.qk_dim * (self.hidden + self.bias_k) + self.v_dim * (self.hidden + self.bias_v)

    def achievable_qk(self) -> list[int]:
        """Every q/k dim reachable with whole pairs and single pass-through channels."""
        return sorted({2 * m + s for m in range(self.pairs + 1) for s in range(self.pass_dim + 1)})

    def qk_floor(self, fraction: float) -> int:
        """The smallest achievable q/k dim >= fraction * qk_dim."""
        need = math.ceil(fraction * self.qk_dim - 1e-9)
        return min(c for c in self.achievable_qk() if c >= min(need, self.qk_dim))


def kv_count(head_to_kv: Sequence[int], heads: Sequence[int]) -> int:
    """How many KV heads the query heads ``heads`` read."""
    return len({head_to_kv[h] for h in heads})


def attention_cost(plan: AttentionPlan, heads: Sequence[int]) -> int:
    """Parameters of ``plan`` after keeping only ``heads`` (dense projections assumed)."""
    return AttentionCost.of_plan(plan).cost(len(heads), kv_count(plan.head_to_kv, heads))


def round_to_multiple(value: float, multiple: int, maximum: int, minimum: int = 0) -> int:
    """Nearest multiple of ``multiple`` in [minimum, maximum] (hardware-friendly FFN widths);
    plain rounding when the maximum is not itself a multiple. ``minimum`` is raised to the
    next multiple (a floor such as a per-layer cap is never undercut by the rounding)."""
    if multiple > 1 and maximum % multiple == 0:
        floor = math.ceil(minimum / multiple - 1e-9) * multiple if minimum > 0 else 0
        return int(min(maximum, max(floor, round(value / multiple) * multiple)))
    return int(min(maximum, max(math.ceil(minimum - 1e-9) if minimum > 0 else 0, round(value))))


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
    return round_to_multiple(target, multiple, inter)
