"""The SoBP-style routine of the IntraSlice authors' code (github Asker0Lee/IntraSlice), as a method.

The IntraSlice paper (arXiv 2602.01975) compares against a SoBP-style baseline (SoBP:
Wei et al., EMNLP 2024). The routine in the IntraSlice authors' code differs from the
project's own ``sobp-exact`` (``prunebench.baselines.sobp``, called ``sobp`` before 0.2,
which stays the project's exact variant) in its allocation, its head score and its selection; this module reproduces it
so results can be compared with the paper's baseline rather than with a stronger one.

What the reference computes
---------------------------
Global stage (allocation ``sobp-paper``; the recipe's importance is ``mask-grad`` with
``grad_group=8, head_score="summed"``: a head scores sum over groups of 8 sequences of the
square of its summed mask gradient, a neuron sum over groups of its squared gradient).
Per layer, a head costs ``per_head = q + o + 2 (G/N) (k, v)`` parameters (its own q rows
and o columns plus its fractional share of the group's K/V; ``N`` query heads, ``G`` KV
heads) and a neuron ``per_neuron = 3 * hidden`` (gate and up rows, down column). Neuron
importances are multiplied by ``250 * per_neuron / per_head`` (head importances are not
scaled); both lists are sorted ascending. For every number ``nh`` of pruned heads, up to
the global cap int(0.8 L N), the rest of the deletion budget goes to neurons,
``nn = int((delete - nh per_head) / per_neuron)`` clipped to int(0.8 L I); the first
``nh`` heads and ``nn`` neurons of the ascending lists are pruned, except that no layer
loses more than ceil(0.8 N) heads or ceil(0.8 I) neurons: a layer's excess is given to
the next units down the global list whose layer still has room. The split with the
smallest summed importance of the pruned units wins. The loop stops at the first ``nh``
whose heads alone overshoot the budget, after one last candidate with
int(delete / per_head) heads and no neurons.

Local stage (attention and FFN ``sobp-paper``): greedy structured Optimal Brain Surgeon
on the output projection, o_proj for heads (blocks of ``v_dim`` columns) and down_proj for
neurons. H = 2 X^T X / n from the projection's inputs (streamed float64 moments); a dead
input (H_jj = 0) gets H_jj = 1 and its weight column is zeroed for the selection; 1% of
the mean diagonal is added; H^-1 by Cholesky. Units are removed one at a time: a neuron
scores ||W[:, j]||^2 / [H^-1]_jj, a head tr(W_S (H^-1_SS)^-1 W_S^T); after each removal W
gets the OBS compensation and H^-1 the Schur-complement downdate that removes the unit.
The greedy W only decides the selection: the kept columns are then rebuilt from the
original weights by the ridge least squares W_K <- W_K + W_P H_PK H_KK^-1 (damped H),
which is the least-squares optimum of the module's output with the pruned inputs gone.
How many units go: neurons, round(I * ratio) rounded down to a multiple of 8 (the
``multiple`` parameter); heads, see ``count`` below.

Options
-------
* ``update_rows`` (attention): the reference's head update reads its rows from the upper
  Cholesky factor U of the original H^-1 (H^-1 = U^T U), never downdated:
  W <- W - W_S (H^-1_SS)^-1 U[S, :]. Its own comment says this is wrong: columns before S
  get no compensation, the others one scaled by U instead of H^-1, and U ignores the
  heads already removed. Only the selection is affected (the reconstruction is exact).
  ``"inverse"`` (default) uses the rows of the current, downdated H^-1: the exact group
  OBS update, under which the greedy order is the order of least total output error.
  ``"cholesky"`` reproduces the reference as it runs.
* ``count`` (attention): ``"params"`` (default) removes a prefix of the greedy order whose
  parameters are nearest the layer's exact budget (``prunebench.harness.budget.heads_to_keep``
  with the greedy order as the ranking: a KV head goes with its last query head, and a
  partly pruned group keeps its K/V, as the reference's physical pruning does; a tie
  removes fewer heads), so the achieved sparsity is the target up to whole heads.
  ``"heads"`` removes round(ratio * N) heads, the reference's count: under GQA it removes
  fewer parameters than the allocation credited (each head is priced with a K/V share
  its group may keep). Either way the greedy order is computed over all heads and cut
  (a greedy run of ``drop`` steps is a prefix of it).

Departures, and why
-------------------
* Reconstruction: the reference sweeps the pruned columns one by one with the rows of
  the upper Cholesky factor of H^-1 (the GPTQ/SparseGPT loop, pruned columns ordered
  first). That sweep equals W_K + W_P H_PK H_KK^-1 on the same damped H, so here it is one
  damped solve (``prunebench.harness.stats.solve_psd``: float64 Cholesky, damping grown
  and least squares as the fallback).
* The deletion budget is the harness's, ``target * decoder parameters`` (biases
  included), not the reference's ``target * L (N per_head + I per_neuron)``; the two agree
  on models without biases. The per-layer ratios are parameter fractions:
  ``nh_l per_head / attention_params`` and ``nn_l per_neuron / mlp_params``. Without
  biases these are exactly the reference's head-count and neuron-count fractions (the
  fractional K/V share makes N per_head the attention's parameters), so the allocation
  removes what the reference counts.
* A split whose neuron share had to be clipped to the global cap (the remaining budget
  needs more neurons than int(0.8 L I)) prunes less than the target; the reference can
  pick it because its total importance is smaller. Here such splits lose to any split
  that meets the budget (``meta["budget_met"]`` is False only when none does, i.e.
  beyond the caps). The reference's last candidate (int(delete / per_head) heads, no
  neurons, short by less than one head) is kept as it is.
* Costs are per layer, read from the ``ModelShape`` (the reference uses one per_head and
  one per_neuron from the config); on a model whose layers all have one shape this is
  the same, and the search prices a prefix of the sorted list by the sum of its units'
  costs, which is then ``nh * per_head`` and ``int(... / per_neuron)``.
* H's scale (2/n over tokens here, over sequences in the reference) changes no score
  ranking, the damping (relative) or the reconstruction.
* After each head removal every pruned column of the greedy W is zeroed (the reference
  zeroes the current head's; with Cholesky rows earlier ones may turn nonzero again, but
  no later score reads them).
* The d x d block inverses use a Cholesky solve (the reference falls back to a pseudo
  inverse; here solve_psd's damping fallback); ties in the ascending sorts follow a
  stable sort (the reference's are torch.sort's).

How this differs from the project's ``sobp-exact``
---------------------------------------------------
``sobp-exact`` is the stronger, exact variant. Its allocation ``sobp-global`` is a joint
knapsack that maximises the kept importance, with the best 20% of every layer's heads and
neurons always kept (no neuron rescaling, no excess reassignment); its importance scores
a head by the sum of its channels' squared mask gradients, one gradient sample per batch;
its local step is the exact structured OBS (inverse-Hessian rows) whose final update is
the block OBS update of the whole removed set, with K/V counted exactly (heads) and the
FFN width nearest the parameter budget. ``sobp-paper`` keeps the reference's scaled
min-pruned-importance search with caps, the squared summed head gradient over groups of
8, the FFN's round-down to a multiple of 8, and the reference's options. With the
defaults (``update_rows="inverse"``, ``count="params"``) its head step selects and
reconstructs as ``sobp-exact``'s does (the block OBS update of the removed set is the ridge
least squares above), apart from the dead-input fix; ``update_rows="cholesky",
count="heads"`` is the reference as it runs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from prunebench.harness.budget import heads_to_keep
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext
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
from prunebench.harness.errors import NumericalError, UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.obs import greedy_channels
from prunebench.harness.scores import head_scores
from prunebench.harness.stats import Moments, damped, solve_psd
from prunebench.harness.surgery import attention_plan_of, keep_channels, keep_heads, mlp_plan_of

UPDATE_ROWS = ("inverse", "cholesky")
HEAD_COUNTS = ("params", "heads")


# ----- the joint head/neuron search (global stage) -------------------------------------------
def unit_costs(layer: LayerShape) -> tuple[float, float]:
    """(per_head, per_neuron) of one layer, the reference's prices: a head owns its q rows
    and o columns plus the fraction G/N of its group's k and v rows; a neuron owns a gate
    row, an up row and a down column."""
    share = layer.num_kv_heads / layer.num_heads if layer.num_heads else 0.0
    per_head = layer.hidden * (layer.qk_dim + layer.v_dim) * (1.0 + share)
    return float(per_head), float(3 * layer.hidden)


def layer_caps(counts: list[int], remain: float) -> list[int]:
    """At most ceil((1 - remain) * count) units of a layer are pruned."""
    return [math.ceil((1.0 - remain) * c) for c in counts]


def eligible_order(scores: list[torch.Tensor], caps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Units of all layers in ascending score order, restricted to those a capped prefix can take.

    Taking the first n units of the global ascending list, keeping in every layer only its
    first ``cap`` and handing the excess down the list to the next units whose layer has
    room (the reference's ``constrained_indicies``) prunes exactly the first n units of
    this list: a unit is eligible when fewer than ``cap`` units of its layer precede it.
    Returns (layer of each eligible unit, its score), in order.
    """
    layer_of = torch.cat([torch.full((s.numel(),), i, dtype=torch.long) for i, s in enumerate(scores)])
    flat = torch.cat([s.to(torch.float64).flatten() for s in scores])
    order = torch.argsort(flat, stable=True)
    lay = layer_of[order]
    by_layer = torch.argsort(lay, stable=True)  # positions grouped by layer, in list order
    counts = torch.bincount(lay, minlength=len(scores))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(lay)
    rank[by_layer] = torch.arange(lay.numel()) - starts[lay[by_layer]]
    keep = rank < torch.as_tensor(caps, dtype=torch.long)[lay]
    return lay[keep], flat[order][keep]


def _prefix(values: torch.Tensor) -> torch.Tensor:
    return torch.cat((torch.zeros(1, dtype=torch.float64), values.to(torch.float64).cumsum(0)))


def _count_within(prefix_cost: torch.Tensor, budget: float) -> int:
    """The largest n with prefix_cost[n] <= budget (a small tolerance for float sums)."""
    tol = 1e-9 * max(abs(budget), 1.0)
    return int(torch.searchsorted(prefix_cost, torch.tensor([budget + tol], dtype=torch.float64), right=True)) - 1


def search_split(
    h_cost: torch.Tensor, h_imp: torch.Tensor, n_cost: torch.Tensor, n_imp: torch.Tensor,
    delete: float, max_heads: int, max_neurons: int,
) -> dict[str, Any]:
    """The reference's loop over the number of pruned heads (prefix sums of the eligible lists).

    Returns the chosen split and how it was found. A split whose neurons were clipped to
    the global cap is kept only when no split meets the budget (see the module doc).
    """
    candidates = []
    for nh in range(min(max_heads, h_cost.numel() - 1) + 1):
        left = delete - float(h_cost[nh])
        last = left < -1e-9 * max(delete, 1.0)
        if last:  # the heads alone overshoot: as many whole heads as fit, no neurons
            nh, nn, clipped = _count_within(h_cost, delete), 0, False
        else:
            want = _count_within(n_cost, left)
            nn, clipped = min(want, max_neurons, n_cost.numel() - 1), want > max_neurons
        removed = float(h_cost[nh] + n_cost[nn])
        candidates.append((float(h_imp[nh] + n_imp[nn]), nh, nn, clipped, removed))
        if last:
            break
    feasible = [c for c in candidates if not c[3]]
    if feasible:
        total, nh, nn, _, removed = min(feasible, key=lambda c: c[0])  # first minimum, as the reference
    else:
        total, nh, nn, _, removed = max(candidates, key=lambda c: c[4])
    return {
        "pruned_heads": nh, "pruned_neurons": nn, "pruned_importance": total, "removed_params": removed,
        "delete_params": delete, "budget_met": bool(feasible), "candidates": len(candidates),
        "clipped_candidates": len(candidates) - len(feasible),
    }


def paper_allocation(
    importance: Importance, target: float, shape: ModelShape,
    neuron_factor: float = 250.0, head_remain: float = 0.2, neuron_remain: float = 0.2,
) -> Allocation:
    """The reference's joint head/neuron search (see the module doc), as per-layer parameter fractions."""
    layers = shape.layers
    if len(importance.attention) != len(layers) or len(importance.mlp) != len(layers):
        raise ValueError("importance must have one attention and one mlp score vector per layer")
    costs = [unit_costs(l) for l in layers]
    h_scores = [head_scores(importance.attention[i], l.num_heads) for i, l in enumerate(layers)]
    n_scores = []
    for i, l in enumerate(layers):
        s = importance.mlp[i].detach().to(torch.float64).flatten()
        if s.numel() != l.intermediate:
            raise ValueError(f"layer {i}: mlp importance has {s.numel()} scores for {l.intermediate} channels")
        per_head, per_neuron = costs[i]
        n_scores.append(s * (neuron_factor * per_neuron / per_head if per_head else 0.0))

    h_layer, h_sorted = eligible_order(h_scores, layer_caps([l.num_heads for l in layers], head_remain))
    n_layer, n_sorted = eligible_order(n_scores, layer_caps([l.intermediate for l in layers], neuron_remain))
    head_price = torch.as_tensor([c[0] for c in costs], dtype=torch.float64)
    neuron_price = torch.as_tensor([c[1] for c in costs], dtype=torch.float64)
    split = search_split(
        _prefix(head_price[h_layer]), _prefix(h_sorted), _prefix(neuron_price[n_layer]), _prefix(n_sorted),
        delete=float(target) * shape.decoder_params,
        max_heads=int((1.0 - head_remain) * sum(l.num_heads for l in layers)),
        max_neurons=int((1.0 - neuron_remain) * sum(l.intermediate for l in layers)),
    )
    heads = torch.bincount(h_layer[: split["pruned_heads"]], minlength=len(layers)).tolist()
    neurons = torch.bincount(n_layer[: split["pruned_neurons"]], minlength=len(layers)).tolist()
    attention = [_fraction(k * c[0], l.attention_params) for k, c, l in zip(heads, costs, layers)]
    mlp = [_fraction(k * c[1], l.mlp_params) for k, c, l in zip(neurons, costs, layers)]
    return Allocation(attention, mlp, meta={
        "rule": "sobp-paper", "neuron_factor": neuron_factor, "head_remain": head_remain,
        "neuron_remain": neuron_remain, "pruned_heads_per_layer": heads, "pruned_neurons_per_layer": neurons,
        "per_head_params": [c[0] for c in costs], "per_neuron_params": [c[1] for c in costs], **split,
    })


def _fraction(removed: float, total: int) -> float:
    return min(1.0, removed / total) if total else 0.0


class SobpPaperAllocation(Component):
    """IntraSlice authors' SoBP-style search: scaled neuron scores, min pruned importance, 80% per-layer caps."""

    kind, name = "allocation", "sobp-paper"
    defaults = {"neuron_factor": 250.0, "head_remain": 0.2, "neuron_remain": 0.2}

    @hookimpl
    def allocate_ratios(
        self, importance: Importance | None, target: float, shape: ModelShape, params: dict[str, Any]
    ) -> Allocation:
        if importance is None:
            raise UsageError("allocation sobp-paper needs global importance scores (e.g. importance=mask-grad)")
        for key in ("head_remain", "neuron_remain"):
            if not 0.0 <= float(params[key]) <= 1.0:
                raise UsageError(f"allocation sobp-paper: {key} must be in [0, 1], got {params[key]!r}")
        return paper_allocation(
            importance, target, shape, float(params["neuron_factor"]),
            float(params["head_remain"]), float(params["neuron_remain"]),
        )


# ----- greedy structured OBS (local stage) ---------------------------------------------------
def paper_hessian(stats: Moments, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damped H = 2 X^T X / n + damping * mean(diag) I (float64) and the dead-input mask.

    A dead input (H_jj = 0: never active on the calibration data) gets H_jj = 1 before the
    damping, as in the reference, so H stays invertible and the input costs nothing.
    """
    h = 2.0 * stats.gram.to(torch.float64) / max(stats.count, 1)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    return damped(h, damping), dead


def inverse_of(h: torch.Tensor) -> torch.Tensor:
    """H^-1 of an already damped H (solve_psd's Cholesky, with its damping fallback), symmetrised."""
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    hinv = solve_psd(h, eye, 0.0)
    return 0.5 * (hinv + hinv.T)


def upper_cholesky(hinv: torch.Tensor, relative: float = 0.001) -> torch.Tensor:
    """U with H^-1 = U^T U (upper triangular), the reference's row source for its head update.

    On failure the reference adds 0.1 x 1% of H^-1's mean diagonal; here that damping
    then grows tenfold (three times) before giving up.
    """
    lam = 0.0
    for _ in range(5):
        upper, info = torch.linalg.cholesky_ex(damped(hinv, lam) if lam else hinv, upper=True)
        if int(info) == 0:
            return upper
        lam = relative if lam == 0.0 else lam * 10
    raise NumericalError("sobp-paper: the inverse Hessian has no Cholesky factor even after damping")


def block_score(weight: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """tr(W_S (H^-1_SS)^-1 W_S^T): the output error of removing the column set S with the OBS update."""
    w = weight[:, cols]
    return float((w * solve_psd(hinv[cols][:, cols], w.T, 0.0).T).sum())


def downdate(hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """H^-1 with the columns S removed (Schur complement; equal to |S| rank-1 downdates). The
    removed rows and columns become 0 with 1 on the diagonal, so later blocks stay invertible."""
    rows = hinv[cols]
    new = hinv - rows.T @ solve_psd(hinv[cols][:, cols], rows, 0.0)
    new[cols] = 0.0
    new[:, cols] = 0.0
    new[cols, cols] = 1.0
    return 0.5 * (new + new.T)


def greedy_heads(
    weight: torch.Tensor, hinv: torch.Tensor, groups: list[torch.Tensor], count: int,
    update_rows: str = "inverse", upper: torch.Tensor | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Remove ``count`` column groups one at a time by block OBS error; returns the order and the greedy W.

    After each removal W <- W - W_S (H^-1_SS)^-1 R[S, :] with R the current H^-1
    (``"inverse"``: the exact group OBS update) or the upper Cholesky factor ``upper`` of
    the original H^-1 (``"cholesky"``: the reference as it runs), and H^-1 is downdated.
    """
    if update_rows not in UPDATE_ROWS:
        raise UsageError(f"update_rows must be one of {', '.join(UPDATE_ROWS)}, got {update_rows!r}")
    if update_rows == "cholesky" and upper is None:
        upper = upper_cholesky(hinv)
    w, h = weight.to(torch.float64).clone(), hinv.to(torch.float64).clone()
    alive, order = list(range(len(groups))), []
    pruned = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    for _ in range(min(count, len(groups))):
        scores = [block_score(w, h, groups[i]) for i in alive]
        pick = alive.pop(min(range(len(scores)), key=scores.__getitem__))  # first minimum
        cols = groups[pick]
        coef = solve_psd(h[cols][:, cols], w[:, cols].T, 0.0).T  # W_S (H^-1_SS)^-1
        w = w - coef @ (h[cols] if update_rows == "inverse" else upper[cols].to(torch.float64))
        h = downdate(h, cols)
        pruned[cols] = True
        w[:, pruned] = 0.0
        order.append(pick)
    return order, w


def reconstruct(weight: torch.Tensor, h: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Kept columns rebuilt from the original weights: W_K + W_P H_PK H_KK^-1 (H damped).

    The ridge least-squares optimum of the output with the removed inputs gone; the
    reference's sequential Cholesky sweep over the removed columns computes the same.
    """
    w = weight.to(torch.float64)
    if removed.numel() == 0 or kept.numel() == 0:
        return w[:, kept].clone()
    rhs = h[kept][:, removed] @ w[:, removed].T  # H_KP W_P^T
    return w[:, kept] + solve_psd(h[kept][:, kept], rhs, 0.0).T


def _complement(n: int, removed: list[int] | torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.as_tensor(removed, dtype=torch.long)] = False
    return mask.nonzero().flatten()


def _head_columns(heads: list[int], width: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * width, (h + 1) * width) for h in heads])


def ffn_drop(intermediate: int, ratio: float, multiple: int) -> int:
    """round(I * ratio) rounded down to a multiple of ``multiple`` (the reference's rule)."""
    drop = round(intermediate * ratio)
    return min(intermediate, (drop // multiple) * multiple if multiple > 1 else drop)


class SobpPaperAttention(Component):
    """IntraSlice authors' SoBP-style head pruning: greedy block OBS on o_proj, then ridge LS reconstruction."""

    kind, name = "attention", "sobp-paper"
    defaults = {"damping": 0.01, "update_rows": "inverse", "count": "params"}

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        if params["count"] not in HEAD_COUNTS:
            raise UsageError(f"attention sobp-paper: count must be one of {', '.join(HEAD_COUNTS)}, got {params['count']!r}")
        if params["update_rows"] not in UPDATE_ROWS:
            raise UsageError(
                f"attention sobp-paper: update_rows must be one of {', '.join(UPDATE_ROWS)}, got {params['update_rows']!r}"
            )
        attn = layer.layer.self_attn
        heads = attn.num_heads
        if ratio <= 0 or heads == 0:
            return None
        plan = attention_plan_of(attn)
        if plan.o.weight is None:
            raise UsageError("sobp-paper needs a dense o_proj (this layer's o_proj is a factor pair)")
        h, dead = paper_hessian(layer.collect({"o_in": True})["o_in"], float(params["damping"]))
        hinv = inverse_of(h)
        w = plan.o.weight.to(torch.float64)
        groups = [torch.arange(i * attn.v_dim, (i + 1) * attn.v_dim) for i in range(heads)]
        order, _ = greedy_heads(w.masked_fill(dead, 0.0), hinv, groups, heads, str(params["update_rows"]))
        if params["count"] == "params":
            rank = torch.empty(heads, dtype=torch.float64)
            rank[torch.as_tensor(order)] = torch.arange(heads, dtype=torch.float64)  # removed earlier = less important
            kept = heads_to_keep(plan, rank, ratio)
        else:
            kept = sorted(set(range(heads)) - set(order[: min(heads, round(ratio * heads))]))
        removed = [i for i in order if i not in set(kept)]
        if not removed:
            return None
        keep_cols, drop_cols = _head_columns(kept, attn.v_dim), _head_columns(sorted(removed), attn.v_dim)
        new_w = w.clone()
        new_w[:, keep_cols] = reconstruct(w, h, keep_cols, drop_cols)
        plan.o = LinearWeights(weight=new_w.to(plan.o.weight.dtype), bias=plan.o.bias)
        new = keep_heads(plan, kept)
        new.summary = {
            "kept_heads": kept, "removed_heads": removed, "greedy_order": order, "num_kv_heads": new.num_kv_heads,
            "count": params["count"], "update_rows": params["update_rows"],
        }
        return new


class SobpPaperFFN(Component):
    """IntraSlice authors' SoBP-style neuron pruning: greedy OBS on down_proj, multiple-of-8 drop, ridge LS reconstruction."""

    kind, name = "ffn", "sobp-paper"
    defaults = {"damping": 0.01, "multiple": 8}

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
        mlp = layer.layer.mlp
        multiple = int(params["multiple"])
        if multiple < 1:
            raise UsageError(f"ffn sobp-paper: multiple must be >= 1, got {multiple}")
        inter = mlp.intermediate
        drop = ffn_drop(inter, ratio, multiple) if ratio > 0 and inter else 0
        if drop <= 0:
            return None
        plan = mlp_plan_of(mlp)
        if plan.down.weight is None:
            raise UsageError("sobp-paper needs a dense down_proj (this layer's down_proj is a factor pair)")
        h, dead = paper_hessian(layer.collect({"down_in": True})["down_in"], float(params["damping"]))
        w = plan.down.weight.to(torch.float64)
        removed, _ = greedy_channels(w.masked_fill(dead, 0.0), inverse_of(h), drop)
        kept = _complement(inter, removed)
        new_w = w.clone()
        new_w[:, kept] = reconstruct(w, h, kept, removed.sort().values)
        updated = replace(plan, down=LinearWeights(weight=new_w.to(plan.down.weight.dtype), bias=plan.down.bias))
        new = keep_channels(updated, kept)
        new.summary = {"intermediate": int(kept.numel()), "dropped": drop}
        return new


@hookimpl
def prunebench_components() -> list[Component]:
    return [SobpPaperAllocation(), SobpPaperAttention(), SobpPaperFFN()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "sobp-paper",
            {
                "importance": ComponentRef("mask-grad", {"grad_group": 8, "head_score": "summed"}),
                "allocation": ComponentRef("sobp-paper"),
                "attention": ComponentRef("sobp-paper"),
                "ffn": ComponentRef("sobp-paper"),
            },
            "The SoBP-style routine of the IntraSlice authors' code (their paper's baseline): squared summed head "
            "gradients over groups of 8, a min-pruned-importance head/neuron search with neurons scaled by "
            "250 x cost ratio and 80% per-layer caps, greedy OBS selection and a least-squares reconstruction. "
            "sobp-exact is the project's exact variant (knapsack of kept importance, exact block OBS).",
            role="method",
        )
    ]
