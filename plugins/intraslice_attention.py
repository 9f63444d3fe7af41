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
default): q/k and v/o keep the same fraction f of their per-head dims (c = p when
they are equal), with c raised to the floor ``ceil(qk_floor * qk_dim)`` (the layer's
current qk_dim); c is rounded to the nearest pair granularity and p takes the rest of the
budget, rounded down (so the plan is within one v/o channel per head of the budget, never
over it). Rule ``qk-floor``: q/k sit at the floor, v/o take the rest. When p would exceed
v_dim, the surplus goes back to q/k. Rule ``shared`` (the reference code's): one common dim
s per kept head for q/k (s/2 whole rotary pairs, plus pass-through channels only with
partial rotary) and v/o; the head search compares p(kappa) = floor of the s at which kappa
spends the budget exactly (the reference's int(K / |kappa|)), never removing a head when
the others would then need more than a head's dims; after the search, the lowest-R_h heads
are deleted until s reaches the q/k floor ``qk_floor * qk_dim`` (the reference hard-codes
96 = 0.75 * 128); the final s is the pair-granular dim nearest to the exact one, at most
the head dim (the reference rounds K / |kappa| to the nearest even number and does not
clip), so the plan is within one pair step of the budget. Where a deletion would overshoot
the head dim the floor still holds: the current heads at the floor, or one fewer at full
dim, whichever is nearer the budget (the reference skips that deletion and keeps a dim
below its floor).

Options (component parameters; the defaults are the project's, the ``intraslice`` recipe
sets the reference's):

* ``pre_delete`` (reference: True): before the search, delete the heads that hold fewer
  than floor(floor(K / H) / 4) of the layer's top-K o_proj input channels by the Eq. 2
  score, K = the kept o_proj dims if every head were kept at the budget's dim.
* ``spectra``: ``"head"`` (reference): Eq. 3's fraction is head h's own eigenvalue share.
  ``"kv-group"``: the share of head h's output energy captured by the top-p eigenvectors
  of its KV group's summed covariance, the basis step 4 really uses under GQA (the same
  as ``"head"`` under MHA, up to rounding).
* ``lsq_prior="zero"`` with ``lsq_ridge_mean="all"`` is the reference's map back exactly:
  it regresses the dense o_proj input X on Z = X_r P (P = U U^T, the block projector onto
  the kept PCA directions) with ridge 1% of mean(diag Z^T Z) over all H * v_dim dims and
  sets W_o <- W_o (P Q_t)^T; since Z^T Z = U Y^T Y U^T with Y = X_r U, P Q_t = U (Y^T Y +
  lambda I)^-1 Y^T X, which is Eq. 6 with prior zero in the reduced coordinates, its ridge
  measured on the kept dims' trace spread over all H * v_dim dims. ``lsq_ridge_mean="kept"``
  (the default) spreads it over the kept dims only: a ridge 1 / (kept fraction) stronger.

Cost: one ``layer.collect`` pass (q_out, k_out moments; o_in Gram) and one attention-only
pass of the dense and the trial attention side by side (Y^T Y and Y^T X), plus small
eigen-decompositions (one per head and per KV group) and one damped solve of size H'p.

Departures from the reference code (and why):
* pair scores use second moments of q and k (rotation invariant; computed from streamed
  moments) instead of ``E|q_j k_j|`` of unrotated channels at the same token;
* the ridge term of Eq. 6 shrinks toward the plain transpose ``Q_2^T`` rather than toward
  zero (``lsq_prior="transpose"``), so a full-rank basis maps back exactly (ratio 0 =
  dense); ``lsq_prior="zero"`` is Eq. 6 as printed (and, with ``lsq_ridge_mean="all"``,
  the reference's map);
* with ``split="equal"`` the q/k floor is enforced on q/k only (the reference also
  deletes heads until the v/o dim reaches it); the greedy step alone decides how many
  heads go (``split="shared"`` is the reference's rule);
* the budget is the layer's parameter count (exact GQA k/v counting), not o_proj dims;
* the greedy loop is "delete the weakest head while the objective strictly improves";
  the reference gates each attempt by a loop index, which can only stop it earlier;
* ``split="shared"``'s forced deletion stops once the *final* (nearest pair-granular) dim
  reaches the floor; the reference compares its floored dim int(K / n) with 96 before
  rounding, so it may delete one head more (or, where that deletion would overshoot the
  head dim, keep a dim below the floor);
* ``pre_delete``'s K is the exact parameter budget's shared dim times H, rounded; the
  reference's K = D - round(D * ratio) kept o_proj dims;
* ``spectra="kv-group"`` takes a group's basis from all its heads' dense covariances (the
  plan's basis sums the kept heads' recomputed outputs);
* the plan really removes heads, pairs and dims (the reference zeroes weights).

``head-prune`` removes whole query heads by R_h (Eq. 2) to meet the budget, with no
PCA and no compensation: the Ada-H ablation (``--set attention=head-prune``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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

SPLITS = ("equal", "qk-floor", "shared")
O_MAPS = ("lsq", "transpose")
LSQ_PRIORS = ("transpose", "zero")
SPECTRA = ("head", "kv-group")
RIDGE_MEANS = ("kept", "all")


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


def group_spectra(o_in: Moments, head_to_kv: Sequence[int]) -> torch.Tensor:
    """Like ``head_spectra``, in the basis the plan really uses under GQA: row h, column p
    is the share of head h's output energy captured by the top-p eigenvectors of its KV
    group's summed covariance (all heads of the group), [H, v_dim + 1].

    Under MHA (one head per group) the basis is the head's own, so the rows equal
    ``head_spectra``'s up to float rounding.
    """
    gram = o_in.covariance().to(torch.float64)
    num_heads = len(head_to_kv)
    v = gram.shape[0] // max(num_heads, 1)
    blocks = [gram[h * v : (h + 1) * v, h * v : (h + 1) * v] for h in range(num_heads)]
    bases: dict[int, torch.Tensor] = {}
    for g in sorted(set(head_to_kv)):
        bases[g] = eigh_descending(sum(blocks[h] for h in range(num_heads) if head_to_kv[h] == g))[1]
    rows = []
    for h, block in enumerate(blocks):
        q = bases[head_to_kv[h]]
        energy = ((block @ q) * q).sum(0).clamp_min(0.0)  # diag(Q^T C_h Q): energy per direction
        total = block.diagonal().sum()
        cum = torch.cat((energy.new_zeros(1), energy.cumsum(0)))
        rows.append((cum / total).clamp(max=1.0) if total > 0 else torch.zeros_like(cum))
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


@dataclass(frozen=True)
class SharedDims:
    """The ``shared`` budget rule: one common dim s per kept head for q/k (s/2 rotary pairs,
    plus pass-through channels only with partial rotary) and v/o, from the layer's exact
    parameter count (``AttentionCost``: k/v rows per kept KV head)."""

    costs: AttentionCost
    budget: float
    head_to_kv: tuple[int, ...]

    @property
    def max_dim(self) -> int:
        return min(self.costs.qk_dim, self.costs.v_dim)

    def exact(self, heads: Sequence[int]) -> float:
        """The real-valued s at which ``heads`` spend the budget exactly (may exceed max_dim)."""
        if not heads:
            return 0.0
        n, g = len(heads), kv_count(self.head_to_kv, heads)
        per_dim = self.costs.per_qk_channel(n, g) + self.costs.per_vo_channel(n, g)
        return (self.budget - self.costs.fixed) / per_dim

    def search(self, heads: Sequence[int]) -> int:
        """What the head search compares: floor of the exact s (the reference's int(K / n))."""
        return math.floor(self.exact(heads) + 1e-9)

    def final(self, heads: Sequence[int]) -> int:
        """The pair-granular dim nearest to the exact s, in [0, max_dim] (ties: the smaller)."""
        target = self.exact(heads)
        options = [c for c in self.costs.achievable_qk() if c <= self.max_dim]
        return min(options, key=lambda c: (abs(c - target), c))


def pre_delete_heads(channel: torch.Tensor, num_heads: int, k: int) -> list[int]:
    """The reference's pre-deletion: heads holding fewer than floor(floor(k / H) / 4) of
    the layer's top-k o_proj input channels by the Eq. 2 score (ties: lower index first)."""
    if num_heads == 0 or k <= 0:
        return []
    width = channel.numel() // num_heads
    top = torch.argsort(channel.to(torch.float64), descending=True, stable=True)[: min(k, channel.numel())]
    counts = torch.bincount(top // width, minlength=num_heads)
    threshold = (k // num_heads) // 4
    return [h for h in range(num_heads) if int(counts[h]) < threshold]


def greedy_heads(
    r_h: torch.Tensor,
    spectra: torch.Tensor,
    head_to_kv: Sequence[int],
    dims: Any,
    start: Sequence[int] | None = None,
    limit: int | None = None,
) -> tuple[list[int], list[dict[str, float]]]:
    """Eqs. 4-5: remove the lowest-R_h head while the reconstruction gain S_g is positive
    (or while the kept heads do not fit the budget at all).

    ``dims(heads)`` gives the common v/o dim p for a kept set; the search starts from
    ``start`` (default: every head) and never removes a head when the others would need
    more than ``limit`` dims to spend the budget (the reference's ``k_now > d`` test).
    Returns the kept heads and the trail of accepted steps (for the summary).
    """
    kept = list(range(len(head_to_kv))) if start is None else list(start)
    trail: list[dict[str, float]] = []
    while len(kept) > 1:
        h = min(kept, key=lambda i: (float(r_h[i]), i))
        rest = [i for i in kept if i != h]
        p_now, p_next = dims(kept), dims(rest)
        if limit is not None and p_next > limit and p_now > 0:
            break
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


def ridge_damping(damping: float, mean: str, kept_dims: int, all_dims: int) -> float:
    """The relative ridge ``o_map_back`` passes to its solve (relative to the mean diagonal
    of Y^T Y over the ``kept_dims`` kept directions). ``mean="all"`` is the reference's:
    ``damping`` x the mean over all H * v_dim o_proj input dims of diag(Z^T Z), Z = X_r P
    (removed heads and dropped directions count as zeros), i.e. the same trace over
    ``all_dims`` instead of ``kept_dims``."""
    return damping * kept_dims / all_dims if mean == "all" and all_dims > 0 else damping


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
    for key, allowed in (("split", SPLITS), ("o_map", O_MAPS), ("lsq_prior", LSQ_PRIORS), ("spectra", SPECTRA),
                         ("lsq_ridge_mean", RIDGE_MEANS)):
        if params[key] not in allowed:
            raise ValueError(f"intraslice-head-pca: {key}={params[key]!r}; choose from {', '.join(allowed)}")
    if not 0.0 <= float(params["qk_floor"]) <= 1.0:
        raise ValueError(f"intraslice-head-pca: qk_floor must be in [0, 1], got {params['qk_floor']!r}")
    if float(params["damping"]) < 0:
        raise ValueError(f"intraslice-head-pca: damping must be >= 0, got {params['damping']!r}")


def _no_heads(plan: AttentionPlan) -> AttentionPlan:
    return keep_heads(plan, [])


def _split_heads(
    costs: AttentionCost, budget: float, r_h: torch.Tensor, spectra: torch.Tensor, channel: torch.Tensor,
    head_to_kv: Sequence[int], params: dict[str, Any],
) -> tuple[list[int], int, int, dict[str, Any]]:
    """Kept heads and their (q/k, v/o) dims by the ``equal`` or ``qk-floor`` rule: optional
    pre-deletion, then the greedy search of Eqs. 4-5 (module docstring)."""
    split, floor = str(params["split"]), float(params["qk_floor"])
    num_heads = len(head_to_kv)

    def dims(heads: Sequence[int]) -> tuple[int, int]:
        return split_dims(costs, budget, len(heads), kv_count(head_to_kv, heads), split, floor)

    pre: list[int] = []
    if params["pre_delete"]:
        pre = pre_delete_heads(channel, num_heads, num_heads * max(dims(range(num_heads))[1], 0))
    start = [h for h in range(num_heads) if h not in pre]
    kept, trail = greedy_heads(r_h, spectra, head_to_kv, lambda hs: dims(hs)[1], start=start if pre else None)
    c, p = dims(kept)
    return kept, c, p, {"pre_deleted": pre, "greedy": trail}


def _shared_heads(
    costs: AttentionCost, budget: float, r_h: torch.Tensor, spectra: torch.Tensor, channel: torch.Tensor,
    head_to_kv: Sequence[int], params: dict[str, Any],
) -> tuple[list[int], int, int, dict[str, Any]]:
    """Kept heads and their common dim by the ``shared`` rule (the reference's): optional
    pre-deletion with K = every head at the shared dim the budget allows, the greedy search
    (p(kept) = floor of the exact shared dim), then forced deletion of the lowest-R_h heads
    until that dim reaches the q/k floor; the final dim is the nearest pair-granular one."""
    rule = SharedDims(costs, budget, tuple(head_to_kv))
    floor_dim = costs.qk_floor(float(params["qk_floor"]))
    num_heads = len(head_to_kv)
    every = list(range(num_heads))
    pre: list[int] = []
    if params["pre_delete"]:
        k = round(num_heads * min(max(rule.exact(every), 0.0), rule.max_dim))
        pre = pre_delete_heads(channel, num_heads, k)
    start = [h for h in every if h not in pre]
    kept, trail = greedy_heads(r_h, spectra, head_to_kv, rule.search, start=start, limit=rule.max_dim)
    kept, forced, dim = _force_floor(rule, r_h, kept, floor_dim, budget)
    info = {"pre_deleted": pre, "greedy": trail, "forced": forced, "exact_dim": rule.exact(kept)}
    return kept, dim, dim, info


def _force_floor(rule: SharedDims, r_h: torch.Tensor, kept: list[int], floor_dim: int,
                 budget: float) -> tuple[list[int], list[int], int]:
    """Delete the lowest-R_h heads until the final shared dim reaches the q/k floor.

    Where deleting one more head would leave the others more dims than a head has (the
    reference skips such a deletion and keeps a dim below its floor), the floor is kept:
    the current heads at the floor dim, or one head fewer at full dim, whichever is nearer
    the budget; the last head likewise stays at the floor or goes. Returns the kept
    heads, the deleted ones and the common dim.
    """
    kept, forced = list(kept), []
    costs = rule.costs
    while kept and rule.final(kept) < floor_dim:
        h = min(kept, key=lambda i: (float(r_h[i]), i))
        rest = [i for i in kept if i != h]
        at_floor = costs.cost(len(kept), kv_count(rule.head_to_kv, kept), floor_dim, floor_dim)
        if not rest:
            fewer = costs.fixed
        elif rule.exact(rest) > rule.max_dim:
            fewer = costs.cost(len(rest), kv_count(rule.head_to_kv, rest), rule.max_dim, rule.max_dim)
        else:
            fewer = None  # deleting still leaves the budget to spend: the reference's forced deletion
        if fewer is not None and abs(at_floor - budget) <= abs(fewer - budget):
            return kept, forced, floor_dim
        kept = rest
        forced.append(h)
    return kept, forced, rule.final(kept) if kept else 0


def plan_head_pca(layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan:
    """The full IntraSlice attention plan of ``layer`` (steps 1-5 of the module docstring)."""
    _check_params(params)
    attn = layer.layer.self_attn
    dense = attention_plan_of(attn)
    costs = AttentionCost.of_plan(dense)
    budget = (1.0 - ratio) * plan_params(dense)
    split = str(params["split"])
    head_to_kv = dense.head_to_kv
    num_heads = len(head_to_kv)

    stats = layer.collect({"o_in": True, "q_out": False, "k_out": False})
    channel = channel_importance(effective_weight(attn.o_proj), stats["o_in"])
    r_h = head_importance(channel, num_heads)
    if params["spectra"] == "head":
        spectra = head_spectra(stats["o_in"], num_heads)
    else:
        spectra = group_spectra(stats["o_in"], head_to_kv)

    choose = _shared_heads if split == "shared" else _split_heads
    kept, c, p, info = choose(costs, budget, r_h, spectra, channel, head_to_kv, params)
    if p <= 0 or not kept:  # the budget cannot hold even one head at the q/k floor
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
        damping = ridge_damping(float(params["damping"]), str(params["lsq_ridge_mean"]), len(kept) * p, num_heads * costs.v_dim)
        o_map = o_map_back(yy, yx, bases, kept, head_to_kv, num_heads, damping, str(params["lsq_prior"]))
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
        **info,
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
        "split": "equal",  # q/k vs v/o: "equal" fractions, "qk-floor", or "shared" (one common dim: the reference)
        "pre_delete": False,  # the reference's pre-deletion of heads with few top-K channels
        "spectra": "head",  # Eq. 3's spectra per query head ("head", reference) or in the KV group's basis ("kv-group")
        "lsq_ridge_mean": "kept",  # Eq. 6 ridge relative to mean(diag) over kept dims ("kept") or all H*v_dim ("all": reference)
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
