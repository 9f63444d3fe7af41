"""IntraSlice attention: adaptive head PCA compression with fused transforms, and its
naive ablation (paper sections 3.1 and C, Algorithm 2; Table 4's first row).

``intraslice-head-pca`` plans one layer's attention in five steps:

1. **Scores** (dense ``o_in`` statistics of the layer as it is now). Channel importance
   ``I_i = E[x_i^2] * ||W_o[:, i]||^2`` (Eq. 2); head importance ``R_h = sum_{i in h} I_i``.
   Reconstruction score of head h kept at p dims ``R_h^p = R_h * (sum of the p largest
   eigenvalues of the head's covariance) / (sum of all)`` (Eq. 3).
2. **Greedy head removal** (Eqs. 4-5). For a set kappa of kept query heads the budget
   rule below gives one common v/o dim p(kappa) (the paper's P/|kappa|, generalised so
   that a KV head whose last query head goes frees its k/v rows). Take the head with the
   lowest R_h; its removal gain is ``S_g = sum_{kappa \\ h} R^{p(kappa \\ h)} - sum_kappa
   R^{p(kappa)}``; remove it while ``S_g > 0``.
3. **Q/K rotary pairs.** A PCA basis cannot pass through RoPE, so q/k keep whole rotary
   pairs (and, with partial rotary, single pass-through channels), selected per KV group
   and shared by all its query heads. A pair's score is its contribution to q.k:
   ``sum_{h in group} sqrt(E||q_h,pair||^2 * E||k_g,pair||^2)`` (a rotation-invariant bound
   on the pair's term of q_t . R(t-s) k_s, for any relative position). The kept pairs keep
   their original frequencies (``prunebench.harness.surgery.keep_qk_pairs``).
4. **V/O PCA.** The attention output is recomputed with the kept heads and pairs (a trial
   layer); per KV group, the covariance of its kept heads' outputs (summed, since the
   group shares one value projection) gives a basis Q_2 of its top-p eigenvectors, fused
   into v_proj.
5. **Map back** (Eq. 6), fused into o_proj: with ``Y = X_r Q_2`` (recomputed outputs in
   the new basis) and X the *dense* o_proj input of all heads (removed ones included),
   ``Q_2* = argmin ||X - Y M||^2 + lambda ||M - Q_2^T||^2``, i.e.
   ``Q_2^T + (Y^T Y + lambda I)^-1 (Y^T X - Y^T Y Q_2^T)``. Kept heads thereby compensate
   for the removed heads, the removed pairs and each other. ``lambda = damping *
   mean(diag(Y^T Y))``.

**Budget split between q/k and v/o** (the layer's attention parameters: q, k, v, o
weights and biases). With H' kept query heads, G' kept KV heads, c the kept q/k channels
and p the kept v/o channels per head, the cost is
``c * (H'(d + b_q) + G'(d + b_k)) + p * (G'(d + b_v) + H' d) + d b_o``. Rule ``equal`` (the
reference's): q/k and v/o keep the same fraction f of their per-head dims (c = p when
they are equal), with c raised to the floor ``ceil(qk_floor * qk_dim)`` (the layer's
current qk_dim); c is rounded to the nearest pair granularity and p takes the rest of the
budget, rounded down (so the plan is within one v/o channel per head of the budget, never
over it). Rule ``qk-floor``: q/k sit at the floor, v/o take the rest. When p would exceed
v_dim, the surplus goes back to q/k.

Cost: one ``layer.collect`` pass (q_out, k_out moments; o_in Gram) and one attention-only
pass of the dense and the trial attention side by side (Y^T Y and Y^T X), plus small
eigen-decompositions (one per head and per KV group) and one damped solve of size H'p.

Departures from the reference code (and why):
* pair scores use second moments of q and k (rotation invariant; computed from streamed
  moments) instead of ``E|q_j k_j|`` of unrotated channels at the same token;
* the ridge term of Eq. 6 shrinks toward the plain transpose ``Q_2^T`` rather than toward
  zero (``lsq_prior="transpose"``), so a full-rank basis maps back exactly (ratio 0 =
  dense); ``lsq_prior="zero"`` is Eq. 6 as printed;
* the q/k floor is enforced on q/k only (the reference also deletes heads until the
  v/o dim reaches it); the greedy step alone decides how many heads go;
* the plan really removes heads, pairs and dims (the reference zeroes weights).

``head-prune`` removes whole query heads by R_h (Eq. 2) to meet the budget, with no
PCA and no compensation: the Ada-H ablation (``--set attention=head-prune``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from prunebench.harness.budget import AttentionCost, heads_to_keep, kv_count, plan_params
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext, position_ids
from prunebench.harness.contracts import AttentionPlan
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.pruned_model import PrunedAttention, effective_weight
from prunebench.harness.scores import weighted_energy
from prunebench.harness.stats import Moments, eigh_descending, solve_psd
from prunebench.harness.surgery import attention_plan_of, build_attention, fuse_vo, keep_heads, keep_qk_pairs

SPLITS = ("equal", "qk-floor")
O_MAPS = ("lsq", "transpose")
LSQ_PRIORS = ("transpose", "zero")


# ----- scores (Eqs. 2-3) --------------------------------------------------------------------
def channel_importance(o_weight: torch.Tensor, o_in: Moments) -> torch.Tensor:
    """Eq. 2: I_i = E[x_i^2] * ||W_o[:, i]||^2 per o_proj input channel (float64)."""
    return weighted_energy(o_weight, o_in.second_moment)


def head_importance(channel: torch.Tensor, num_heads: int) -> torch.Tensor:
    """R_h: the summed channel importance of each query head's v_dim block."""
    return channel.reshape(num_heads, -1).sum(1)


def head_spectra(o_in: Moments, num_heads: int) -> torch.Tensor:
    """Cumulative eigenvalue fractions of each head's output covariance, [H, v_dim + 1].

    Row h, column p is (sum of the p largest eigenvalues) / (sum of all) of head h: the
    factor of Eq. 3. A head with no output energy gets 0 everywhere (it reconstructs
    nothing whatever p is).
    """
    gram = o_in.covariance()
    v = gram.shape[0] // max(num_heads, 1)
    rows = []
    for h in range(num_heads):
        block = gram[h * v : (h + 1) * v, h * v : (h + 1) * v]
        vals = torch.linalg.eigvalsh(block.to(torch.float64)).flip(0).clamp_min(0.0)
        total = vals.sum()
        cum = torch.cat((vals.new_zeros(1), vals.cumsum(0)))
        rows.append(cum / total if total > 0 else torch.zeros_like(cum))
    return torch.stack(rows) if rows else torch.zeros(0, v + 1, dtype=torch.float64)


def reconstruction_score(r_h: torch.Tensor, spectra: torch.Tensor, heads: Sequence[int], p: int) -> float:
    """Eq. 3 summed over ``heads``: sum_h R_h * fraction_h(p), p clamped to [0, v_dim]."""
    if not heads:
        return 0.0
    p = int(min(max(p, 0), spectra.shape[1] - 1))
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    return float((r_h[idx] * spectra[idx, p]).sum())


# ----- the budget rule ------------------------------------------------------------------------
def split_dims(costs: AttentionCost, budget: float, heads: int, kv_heads: int, split: str, floor: float) -> tuple[int, int]:
    """(c, p): kept q/k and v/o dims per head for ``heads`` query and ``kv_heads`` KV heads
    under ``budget`` parameters, by the split rule (module docstring). p may be <= 0 when
    the budget cannot hold these heads at the q/k floor."""
    if heads == 0:
        return 0, 0
    a_qk, a_vo = costs.per_qk_channel(heads, kv_heads), costs.per_vo_channel(heads, kv_heads)
    room = budget - costs.fixed
    achievable = costs.achievable_qk()
    c_min = costs.qk_floor(floor)
    if split == "equal":
        f = room / (costs.qk_dim * a_qk + costs.v_dim * a_vo)
        target = f * costs.qk_dim
        c = min(achievable, key=lambda x: (abs(x - target), x))
        c = max(c, c_min)
    else:
        c = c_min
    p = math.floor((room - c * a_qk) / a_vo + 1e-9)
    if p > costs.v_dim:  # v/o saturated: give the surplus back to q/k
        p = costs.v_dim
        spare = (room - p * a_vo) / a_qk + 1e-9
        c = max([x for x in achievable if x <= spare] or [c])
    return int(c), int(p)


def greedy_heads(
    r_h: torch.Tensor,
    spectra: torch.Tensor,
    head_to_kv: Sequence[int],
    dims: Any,
) -> tuple[list[int], list[dict[str, float]]]:
    """Eqs. 4-5: remove the lowest-R_h head while the reconstruction gain S_g is positive
    (or while the kept heads do not fit the budget at all).

    ``dims(heads)`` gives the common v/o dim p for a kept set. Returns the kept heads and
    the trail of accepted steps (for the summary).
    """
    kept = list(range(len(head_to_kv)))
    trail: list[dict[str, float]] = []
    while len(kept) > 1:
        h = min(kept, key=lambda i: (float(r_h[i]), i))
        rest = [i for i in kept if i != h]
        p_now, p_next = dims(kept), dims(rest)
        gain = reconstruction_score(r_h, spectra, rest, p_next) - reconstruction_score(r_h, spectra, kept, p_now)
        # p <= 0: the budget cannot hold these heads at the q/k floor, so a head must go.
        if not (gain > 0 or p_now <= 0):
            break
        trail.append({"removed": h, "gain": gain, "p": p_next})
        kept = rest
    return kept, trail


# ----- q/k rotary pairs -----------------------------------------------------------------------
def qk_channel_energy(q_out: Moments, k_out: Moments, num_heads: int, num_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E[q^2] per query head [H, qk_dim] and E[k^2] per KV head [G, qk_dim]."""
    return q_out.second_moment.reshape(num_heads, -1), k_out.second_moment.reshape(num_kv, -1)


def qk_unit_scores(
    eq: torch.Tensor, ek: torch.Tensor, head_to_kv: Sequence[int], heads: Sequence[int], pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contribution of each rotary pair per KV group [G, n] and of each pass-through
    channel (summed over groups) [pass]: sum over the group's kept query heads of
    sqrt(E||q_unit||^2 * E||k_unit||^2)."""
    num_kv, dim = ek.shape
    pair_scores = torch.zeros(num_kv, pairs, dtype=torch.float64, device=ek.device)
    pass_scores = torch.zeros(dim - 2 * pairs, dtype=torch.float64, device=ek.device)
    for h in heads:
        g = head_to_kv[h]
        q, k = eq[h].to(torch.float64), ek[g].to(torch.float64)
        qp = q[:pairs] + q[pairs : 2 * pairs]
        kp = k[:pairs] + k[pairs : 2 * pairs]
        pair_scores[g] += (qp * kp).clamp_min(0).sqrt()
        pass_scores += (q[2 * pairs :] * k[2 * pairs :]).clamp_min(0).sqrt()
    return pair_scores, pass_scores


def select_qk(pair_scores: torch.Tensor, pass_scores: torch.Tensor, c: int) -> tuple[torch.Tensor, list[int]]:
    """Best (pairs per group [G, m], pass channels) with 2m + s = c: the split of c between
    pairs and pass-through channels that keeps the largest total score."""
    _num_kv, n = pair_scores.shape
    pass_dim = pass_scores.numel()
    sorted_pairs = pair_scores.sort(dim=1, descending=True)
    sorted_pass = pass_scores.sort(descending=True)
    best: tuple[float, int] | None = None
    for m in range(min(n, c // 2) + 1):
        s = c - 2 * m
        if s > pass_dim:
            continue
        total = float(sorted_pairs.values[:, :m].sum()) + float(sorted_pass.values[:s].sum())
        if best is None or total > best[0]:
            best = (total, m)
    if best is None:
        raise ValueError(f"q/k dim {c} is not reachable with {n} pairs and {pass_dim} pass-through channels")
    m = best[1]
    pairs = sorted_pairs.indices[:, :m].sort(dim=1).values.cpu()  # index tensors live on the CPU, as surgery's do
    kept_pass = sorted(sorted_pass.indices[: c - 2 * m].tolist())
    return pairs, kept_pass


# ----- v/o statistics on the recomputed attention ----------------------------------------------
@torch.no_grad()
def joint_o_in(layer: LayerContext, trial: PrunedAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """Y^T Y and Y^T X over the calibration inputs, float64: Y = o_proj input of the
    ``trial`` attention, X = o_proj input of the layer's current (dense) attention.

    ``layer.collect`` gives per-site moments of one layer; Eq. 6 needs the cross moment
    between two attentions fed the same tokens, so both run here side by side (attention
    only; the MLP is not needed).
    """
    block, model = layer.layer, layer.model
    dense = block.self_attn
    grabbed: dict[str, torch.Tensor] = {}
    hooks = [
        dense.o_proj.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("x", a[0])),
        trial.o_proj.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("y", a[0])),
    ]
    inputs = layer.inputs
    freqs = model.model.rotary_freqs(position_ids(inputs.shape[1], inputs.device))
    yy = torch.zeros(trial.o_proj.in_features, trial.o_proj.in_features, dtype=torch.float64, device=inputs.device)
    yx = torch.zeros(trial.o_proj.in_features, dense.o_proj.in_features, dtype=torch.float64, device=inputs.device)
    try:
        for s in range(0, inputs.shape[0], layer.run.batch_size):
            h = block.input_layernorm(inputs[s : s + layer.run.batch_size])
            dense(h, freqs, None, None)
            trial(h, freqs, None, None)
            x = grabbed["x"].reshape(-1, grabbed["x"].shape[-1]).to(torch.float32)
            y = grabbed["y"].reshape(-1, grabbed["y"].shape[-1]).to(torch.float32)
            yy += (y.T @ y).to(torch.float64)
            yx += (y.T @ x).to(torch.float64)
    finally:
        for hook in hooks:
            hook.remove()
    return yy, yx


def group_bases(yy: torch.Tensor, kept_kv_of_head: Sequence[int], num_kv: int, v_dim: int, p: int) -> torch.Tensor:
    """Per KV head, the top-p eigenvectors of the summed covariance of its kept query
    heads' recomputed outputs, [G, v_dim, p] (a KV head with no kept reader gets an
    arbitrary orthonormal basis: it is removed afterwards)."""
    bases = torch.eye(v_dim, dtype=torch.float64, device=yy.device)[:, :p].repeat(num_kv, 1, 1)
    sums: dict[int, torch.Tensor] = {}
    for i, g in enumerate(kept_kv_of_head):
        block = yy[i * v_dim : (i + 1) * v_dim, i * v_dim : (i + 1) * v_dim]
        sums[g] = sums[g] + block if g in sums else block.clone()
    for g, cov in sums.items():
        bases[g] = eigh_descending(cov)[1][:, :p]
    return bases


def o_map_back(
    yy: torch.Tensor,
    yx: torch.Tensor,
    bases: torch.Tensor,
    kept: Sequence[int],
    head_to_kv: Sequence[int],
    num_heads: int,
    damping: float,
    prior: str,
) -> torch.Tensor:
    """Eq. 6: the map M [H*p, H*v_dim] with (dense o_in) ~= (new o_in) @ M, rows of
    removed heads zero. ``prior`` is what the ridge term shrinks toward (module docstring)."""
    v_dim, p = bases.shape[1], bases.shape[2]
    qb = torch.block_diag(*[bases[head_to_kv[h]] for h in kept])  # [H'v, H'p]
    a = qb.T @ yy @ qb
    cross = qb.T @ yx  # [H'p, H v]
    p0 = torch.zeros_like(cross)
    for i, h in enumerate(kept):
        p0[i * p : (i + 1) * p, h * v_dim : (h + 1) * v_dim] = bases[head_to_kv[h]].T
    if prior == "transpose":
        m = p0 + solve_psd(a, cross - a @ p0, damping)
    else:
        m = solve_psd(a, cross, damping)
    full = m.new_zeros(num_heads * p, num_heads * v_dim)
    for i, h in enumerate(kept):
        full[h * p : (h + 1) * p] = m[i * p : (i + 1) * p]
    return full


def o_map_back_transpose(bases: torch.Tensor, kept: Sequence[int], head_to_kv: Sequence[int], num_heads: int) -> torch.Tensor:
    """The plain transpose map (no compensation): block h = Q_2[g(h)]^T, rows of removed
    heads zero."""
    v_dim, p = bases.shape[1], bases.shape[2]
    full = bases.new_zeros(num_heads * p, num_heads * v_dim)
    for h in kept:
        full[h * p : (h + 1) * p, h * v_dim : (h + 1) * v_dim] = bases[head_to_kv[h]].T
    return full


# ----- the planner ---------------------------------------------------------------------------
def _check_params(params: dict[str, Any]) -> None:
    for key, allowed in (("split", SPLITS), ("o_map", O_MAPS), ("lsq_prior", LSQ_PRIORS)):
        if params[key] not in allowed:
            raise ValueError(f"intraslice-head-pca: {key}={params[key]!r}; choose from {', '.join(allowed)}")
    if not 0.0 <= float(params["qk_floor"]) <= 1.0:
        raise ValueError(f"intraslice-head-pca: qk_floor must be in [0, 1], got {params['qk_floor']!r}")
    if float(params["damping"]) < 0:
        raise ValueError(f"intraslice-head-pca: damping must be >= 0, got {params['damping']!r}")


def _no_heads(plan: AttentionPlan) -> AttentionPlan:
    return keep_heads(plan, [])


def plan_head_pca(layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan:
    """The full IntraSlice attention plan of ``layer`` (steps 1-5 of the module docstring)."""
    _check_params(params)
    attn = layer.layer.self_attn
    dense = attention_plan_of(attn)
    costs = AttentionCost.of_plan(dense)
    budget = (1.0 - ratio) * plan_params(dense)
    split, floor = str(params["split"]), float(params["qk_floor"])
    head_to_kv = dense.head_to_kv
    num_heads = len(head_to_kv)

    stats = layer.collect({"o_in": True, "q_out": False, "k_out": False})
    r_h = head_importance(channel_importance(effective_weight(attn.o_proj), stats["o_in"]), num_heads)
    spectra = head_spectra(stats["o_in"], num_heads)

    def dims(heads: Sequence[int]) -> tuple[int, int]:
        return split_dims(costs, budget, len(heads), kv_count(head_to_kv, heads), split, floor)

    kept, trail = greedy_heads(r_h, spectra, head_to_kv, lambda hs: dims(hs)[1])
    c, p = dims(kept)
    if p <= 0:  # the budget cannot hold even one head at the q/k floor
        plan = _no_heads(dense)
        plan.summary = {"kept_heads": [], "reason": "budget below one head", "params": plan_params(plan)}
        return plan

    eq, ek = qk_channel_energy(stats["q_out"], stats["k_out"], num_heads, dense.num_kv_heads)
    pair_scores, pass_scores = qk_unit_scores(eq, ek, head_to_kv, kept, costs.pairs)
    pairs, kept_pass = select_qk(pair_scores, pass_scores, c)
    qk_plan = keep_qk_pairs(dense, pairs, kept_pass)

    p = min(p, costs.v_dim)
    trial = build_attention(layer.model, layer.index, keep_heads(qk_plan, kept))[0]
    yy, yx = joint_o_in(layer, trial)
    bases = group_bases(yy, [head_to_kv[h] for h in kept], dense.num_kv_heads, costs.v_dim, p)
    if params["o_map"] == "lsq":
        o_map = o_map_back(yy, yx, bases, kept, head_to_kv, num_heads, float(params["damping"]), str(params["lsq_prior"]))
    else:
        o_map = o_map_back_transpose(bases, kept, head_to_kv, num_heads)
    device = dense.v.weight.device
    plan = fuse_vo(qk_plan, bases.to(device), o_map.to(device))
    plan = keep_heads(plan, kept)
    plan.summary = {
        "kept_heads": kept,
        "removed_heads": [h for h in range(num_heads) if h not in kept],
        "num_kv_heads": plan.num_kv_heads,
        "head_to_kv": list(plan.head_to_kv),
        "qk_dim": plan.qk_dim,
        "v_dim": plan.v_dim,
        "budget": budget,
        "params": plan_params(plan),
        "split": split,
        "greedy": trail,
    }
    return plan


# ----- components ------------------------------------------------------------------------------
class IntraSliceHeadPCA(Component):
    """IntraSlice adaptive head PCA: greedy head removal, rotary-pair q/k selection, v/o PCA with a least-squares map back."""

    kind, name = "attention", "intraslice-head-pca"
    defaults = {
        "damping": 0.01,  # ridge of Eq. 6, relative to mean(diag(Y^T Y))
        "qk_floor": 0.75,  # kept q/k dim >= qk_floor * qk_dim
        "o_map": "lsq",  # "lsq" (Q_2*, Eq. 6) or "transpose" (plain Q_2^T, no compensation)
        "lsq_prior": "transpose",  # ridge shrinks toward Q_2^T ("transpose") or 0 ("zero", Eq. 6 as printed)
        "split": "equal",  # budget split between q/k and v/o: "equal" fractions or "qk-floor"
    }

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        if layer.layer.self_attn.num_heads == 0:
            return None
        return plan_head_pca(layer, float(ratio), params)


class HeadPrune(Component):
    """Remove whole query heads by R_h (Eq. 2) to meet the budget: no PCA, no compensation (Ada-H ablation)."""

    kind, name = "attention", "head-prune"

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        attn = layer.layer.self_attn
        if ratio <= 0 or attn.num_heads == 0:
            return None
        plan = attention_plan_of(attn)
        o_in = layer.collect(["o_in"])["o_in"]
        r_h = head_importance(channel_importance(effective_weight(attn.o_proj), o_in), attn.num_heads)
        kept = heads_to_keep(plan, r_h, ratio)
        new = keep_heads(plan, kept)
        new.summary = {"kept_heads": kept, "num_kv_heads": new.num_kv_heads, "params": plan_params(new)}
        return new


@hookimpl
def prunebench_components() -> list[Component]:
    return [IntraSliceHeadPCA(), HeadPrune()]
