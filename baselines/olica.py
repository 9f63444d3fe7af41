"""Olica (He & Lin, ICML 2025): orthogonal neuron decomposition and linear calibration.

Attention (``olica``)
---------------------
The head computes with two products, W_q W_k^T and W_v W_o^T; Olica compresses the
products rather than either factor.

* V/O (the paper's fast decomposition, as in its reference code): per head, the o_proj
  block W_o^h [d, v] is weighted by s_j = sqrt(E ||o_j||^2), the root second moment of
  the head's output channel j (statistics at ``o_in``), and decomposed:
  diag(s) W_o^h^T = U Sigma V^T. The v-space basis B = diag(1/s) U is fused into W_v
  (new v channels z = B^T v) and the rest, W_o^h diag(s) U = V Sigma, into W_o, so
  W_v W_o is preserved exactly with inner dims ordered by singular value, i.e. by how
  much output energy they carry; then the last inner dims are cut
  (``prunebench.harness.surgery.fuse_vo``).
  GQA: v_proj rows belong to a KV head, shared by its query heads, so one basis serves
  the whole group: the weighted o-blocks of the group's heads are stacked side by side,
  diag(s_g) [W_o^{h1 T}, W_o^{h2 T}, ...], with s_g pooled over the group
  (s_g,j^2 = mean over its heads of E o_{h,j}^2), and decomposed once; every head of the
  group gets o-map block U_p^T diag(s_g). Under MHA this is exactly the per-head
  decomposition.
* Q/K: RoPE sits between W_q and W_k^T, so their product cannot be factorised. As the
  reference does, each projection is replaced separately by an activation-weighted
  truncated SVD: W diag(a) = U Sigma V^T with a_i = sqrt(E x_i^2) of the attention input,
  W ~= (U_r sqrt(Sigma_r)) (sqrt(Sigma_r) V_r^T diag(1/a)), stored as a factor pair. Its
  parameters, r (m + n), count toward the layer: q/k keep RoPE and the head layout, since
  the pair outputs all of q/k.
* Budget split: the reference's ``--k 3`` is the ratio of q/k to v/o parameters removed;
  here ``qk_vo`` (default 3): v/o lose 1 / (1 + qk_vo) of the attention's removed
  parameters (rounded to whole inner dims), q/k the rest, at one ratio for both
  (rank = floor(m n (1 - rho) / (m + n))). If q/k would lose more than ``max_qk_ratio``,
  the excess moves to v/o.

FFN (``olica``)
---------------
Wanda-style structured channel pruning (mean_i |W_down[i, j]| * sqrt(E x_j^2)), then
linear calibration: the residual error Y = dense MLP(X) - pruned MLP(X) on captured
samples X of the MLP input is regressed on X by ridge least squares,
B = (X^T X + lambda I)^-1 X^T Y with lambda = ``ridge`` * mean(diag X^T X), B is
truncated by SVD to rank round(``rank_ratio`` * d) and added as the MLP's parallel
low-rank branch (d -> d factor pair). The branch's 2 d r parameters count toward the
layer's budget: a calibrated layer prunes that many more channel-parameters.

Which layers are calibrated: the reference calibrates a fixed number of MLPs (6 of
LLaMA-7B's 32) whose residual is most linearly predictable. Layers are processed in
order here, so the decision is made per layer: the map is fitted on the first
(1 - ``holdout``) of the samples and its relative residual reduction
1 - ||Y - X B_r||^2 / ||Y||^2 is measured on the held-out rest; the layer is calibrated
when that gain is at least ``min_gain`` and fewer than
round(``calibrated_fraction`` * num_layers) earlier layers carry a branch (default
6/32). A calibrated layer's final map is refitted on all samples. ``min_gain`` = 0.1 was
read off SmolLM2-135M's calibration data (16 x 256 tokens, 20% and 30%): held-out gains
run 0.02-0.14 across its 30 layers, and 0.1 admits about the 6 most predictable (the
first, the middle 13-16 and the last), where a low threshold would spend every slot on
the first six layers in order. It is a per-model choice: check the ``gain`` recorded in
each layer's summary.

Defaults follow the reference code (docs/METHODS.md): rank 0.03 d, 6/32 of the layers, ridge 0.5 (the
reference's ``percdamp`` at its default 256 x 128 calibration tokens; it scales it by
1/data size, we keep it relative to mean(diag X^T X)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from prunebench.harness.budget import AttentionCost, channels_to_keep, plan_params, round_to_multiple
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext
from prunebench.harness.contracts import AttentionPlan, ComponentRef, LinearWeights, MLPPlan, Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.pruned_model import PrunedMLP
from prunebench.harness.scores import wanda_channel_scores
from prunebench.harness.stats import solve_psd
from prunebench.harness.surgery import attention_plan_of, fuse_vo, keep_channels, mlp_plan_of

# ----- attention: V/O orthogonal decomposition ------------------------------------------------


def _heads_of(head_to_kv: list[int], g: int) -> list[int]:
    return [h for h, kv in enumerate(head_to_kv) if kv == g]


def vo_decomposition(plan: AttentionPlan, o_second_moment: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV group, the full ordered basis and the o-map factor (see module doc).

    Returns ``basis`` [G, v, v] (columns in decreasing importance; fused into W_v as
    ``v @ basis[g]``) and ``back`` [G, v, v] (rows: old head output ~= new @ back[g][:p]).
    """
    if plan.o.weight is None:
        raise UsageError("olica needs a dense o_proj")
    v, heads = plan.v_dim, len(plan.head_to_kv)
    w_o = plan.o.weight.to(torch.float64)
    energy = o_second_moment.to(torch.float64).reshape(heads, v)
    bases, backs = [], []
    for g in range(plan.num_kv_heads):
        members = _heads_of(plan.head_to_kv, g)
        s = energy[members].mean(0).clamp_min(0).sqrt()
        s = s.clamp_min(eps * float(s.max().clamp_min(eps)))
        stacked = torch.cat([w_o[:, h * v : (h + 1) * v].T for h in members], dim=1)  # [v, |g| d]
        u, _, _ = torch.linalg.svd(s[:, None] * stacked, full_matrices=False)  # u: [v, v]
        bases.append(u / s[:, None])  # diag(1/s) U
        backs.append(u.T * s[None, :])  # U^T diag(s)
    return torch.stack(bases), torch.stack(backs)


def compress_vo(plan: AttentionPlan, basis: torch.Tensor, back: torch.Tensor, p: int) -> AttentionPlan:
    """Keep the first ``p`` inner v/o dims of every KV group (fused into v_proj and o_proj)."""
    o_map = torch.block_diag(*[back[g][:p] for g in plan.head_to_kv])
    return fuse_vo(plan, basis[:, :, :p], o_map)


# ----- attention: Q/K weighted SVD --------------------------------------------------------------
def weighted_svd_factors(weight: torch.Tensor, in_scale: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the truncated SVD of W diag(a), mapped back: W ~= up @ down."""
    a = in_scale.to(torch.float64)
    a = a.clamp_min(1e-8 * float(a.max().clamp_min(1e-30)))
    u, sigma, vh = torch.linalg.svd(weight.to(torch.float64) * a[None, :], full_matrices=False)
    root = sigma[:rank].sqrt()
    return root[:, None] * vh[:rank] / a[None, :], u[:, :rank] * root


def lowrank_rank(m: int, n: int, ratio: float) -> int:
    """floor(m n (1 - rho) / (m + n)): the rank whose factor pair keeps (1 - rho) of m n."""
    return math.floor(m * n * (1.0 - ratio) / (m + n))


def factor_projection(w: LinearWeights, in_scale: torch.Tensor, ratio: float) -> tuple[LinearWeights, int | None]:
    """The projection as a weighted-SVD factor pair with ``ratio`` of its parameters removed
    (dense when that saves nothing)."""
    if w.weight is None:
        raise UsageError("olica needs dense q/k projections")
    m, n = w.weight.shape
    rank = max(1, lowrank_rank(m, n, ratio))
    if ratio <= 0 or rank * (m + n) >= m * n:
        return w, None
    down, up = weighted_svd_factors(w.weight, in_scale, rank)
    dt = w.weight.dtype
    return LinearWeights(down=down.to(dt).contiguous(), up=up.to(dt).contiguous(), bias=w.bias), rank


def _vo_params(plan: AttentionPlan, p: int) -> int:
    """Parameters of v_proj and o_proj with inner dim ``p`` per head."""
    cost = AttentionCost.of_plan(plan)
    return p * cost.per_vo_channel(len(plan.head_to_kv), plan.num_kv_heads) + cost.fixed


def split_budget(plan: AttentionPlan, ratio: float, qk_vo: float, max_qk_ratio: float) -> tuple[int, float]:
    """(p, rho): inner v/o dim per head and the q/k parameter ratio for the layer's budget."""
    total = plan_params(plan)
    qk = plan.q.num_params() + plan.k.num_params()
    vo_now = plan.v.num_params() + plan.o.num_params()
    removed = ratio * total
    vo_target = vo_now - removed / (1.0 + qk_vo)
    per_dim = (vo_now - _vo_params(plan, 0)) / max(plan.v_dim, 1)
    p = int(min(plan.v_dim, max(1, round((vo_target - _vo_params(plan, 0)) / max(per_dim, 1e-9)))))
    while True:
        qk_budget = (1.0 - ratio) * total - _vo_params(plan, p)
        rho = 1.0 - qk_budget / qk if qk else 0.0
        if rho <= max_qk_ratio or p <= 1:
            return p, max(rho, 0.0)
        p -= 1


class OlicaAttention(Component):
    """Olica: V/O orthogonal decomposition per KV group, weighted-SVD factor pairs for Q/K."""

    kind, name = "attention", "olica"
    defaults = {"qk_vo": 3.0, "max_qk_ratio": 0.9}

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        attn = layer.layer.self_attn
        if ratio <= 0 or attn.num_heads == 0:
            return None
        stats = layer.collect(["attn_in", "o_in"])
        plan = attention_plan_of(attn)
        p, rho = split_budget(plan, ratio, float(params["qk_vo"]), float(params["max_qk_ratio"]))
        if p < plan.v_dim:
            basis, back = vo_decomposition(plan, stats["o_in"].second_moment)
            plan = compress_vo(plan, basis, back, p)
        scale = stats["attn_in"].second_moment.clamp_min(0).sqrt()
        plan.q, rank_q = factor_projection(plan.q, scale, rho)
        plan.k, rank_k = factor_projection(plan.k, scale, rho)
        plan.summary = {"v_dim": p, "q_rank": rank_q, "k_rank": rank_k, "qk_ratio": rho}
        return plan


# ----- FFN: channel pruning + linear calibration ------------------------------------------------
def plan_mlp_output(plan: MLPPlan, x: torch.Tensor, act: Any) -> torch.Tensor:
    """The MLP a plan describes applied to samples x [N, d] (in x's dtype; no branch)."""
    def lin(w: LinearWeights, h: torch.Tensor) -> torch.Tensor:
        if w.weight is not None:
            return F.linear(h, w.weight.to(h.dtype), None if w.bias is None else w.bias.to(h.dtype))
        return F.linear(F.linear(h, w.down.to(h.dtype)), w.up.to(h.dtype), None if w.bias is None else w.bias.to(h.dtype))

    return lin(plan.down, act(lin(plan.gate, x)) * lin(plan.up, x))


def fit_calibration(x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge map X -> Y, SVD-truncated: returns (down [r, d_in], up [d_out, r]) with
    Y ~= X (up @ down)^T. float64."""
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    b = solve_psd(x64.T @ x64, x64.T @ y64, ridge)  # [d_in, d_out]
    u, sigma, vh = torch.linalg.svd(b.T, full_matrices=False)  # B^T = U S V^T
    root = sigma[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def residual_gain(x: torch.Tensor, y: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> float:
    """1 - ||Y - X (up down)^T||^2 / ||Y||^2: the relative residual reduction of a map."""
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    pred = (x64 @ down.T) @ up.T
    denom = float(y64.pow(2).sum())
    return 1.0 - float((y64 - pred).pow(2).sum()) / denom if denom > 0 else 0.0


def channels_for_budget(plan: MLPPlan, budget: float, multiple: int) -> int:
    """Channels whose gate/up/down parameters fit ``budget`` (rounded as channels_to_keep)."""
    inter = plan.intermediate
    per_channel = plan_params(MLPPlan(plan.gate, plan.up, plan.down)) / inter
    fixed = plan_params(MLPPlan(plan.gate, plan.up, plan.down)) - per_channel * inter
    return round_to_multiple((budget - fixed) / per_channel, multiple, inter)


class OlicaFFN(Component):
    """Olica: Wanda-style channel pruning plus a low-rank linear calibration branch on chosen layers."""

    kind, name = "ffn", "olica"
    defaults = {
        "multiple": 8,
        "rank_ratio": 0.03,
        "calibrated_fraction": 6 / 32,
        "min_gain": 0.1,
        "ridge": 0.5,
        "max_tokens": 32768,
        "holdout": 0.25,
    }

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
        mlp = layer.layer.mlp
        if ratio <= 0 or mlp.intermediate == 0:
            return None
        plan = mlp_plan_of(mlp)
        if plan.down.weight is None:
            raise UsageError("olica needs a dense down_proj")
        stats = layer.collect(["down_in"])["down_in"]
        order = torch.argsort(wanda_channel_scores(plan.down.weight, stats.second_moment), descending=True, stable=True)
        multiple = int(params["multiple"])
        plain_keep = channels_to_keep(plan, ratio, multiple)
        plain = keep_channels(plan, order[:plain_keep])
        plain.summary = {"intermediate": plain_keep, "calibrated": False}
        if not self._eligible(layer, mlp, params):
            return plain

        d = mlp.down_proj.out_features
        rank = max(1, round(float(params["rank_ratio"]) * d))
        budget = (1.0 - ratio) * plan_params(plan) - 2 * d * rank
        keep = channels_for_budget(plan, budget, multiple)
        pruned = keep_channels(plan, order[:keep])
        x = layer.capture("mlp_in", int(params["max_tokens"]))
        with torch.no_grad():
            y = mlp(x.to(mlp.down_proj.weight.dtype)).to(x.dtype) - plan_mlp_output(pruned, x, mlp.act_fn)
        gain = self._heldout_gain(x, y, rank, params)
        plain.summary["gain"] = gain
        if gain < float(params["min_gain"]):
            return plain
        down, up = fit_calibration(x, y, rank, float(params["ridge"]))
        dt = plan.down.weight.dtype
        pruned.branch = LinearWeights(down=down.to(dt).contiguous(), up=up.to(dt).contiguous())
        pruned.summary = {
            "intermediate": keep,
            "calibrated": True,
            "branch_rank": rank,
            "gain": gain,
            "fit_gain": residual_gain(x, y, down, up),
        }
        return pruned

    @staticmethod
    def _eligible(layer: LayerContext, mlp: PrunedMLP, params: dict[str, Any]) -> bool:
        """Calibration slots left: fewer than round(fraction * L) earlier layers have a branch."""
        if mlp.branch is not None:
            return False
        layers = layer.model.model.layers
        slots = round(float(params["calibrated_fraction"]) * len(layers))
        used = sum(layers[i].mlp.branch is not None for i in range(layer.index))
        return used < slots

    @staticmethod
    def _heldout_gain(x: torch.Tensor, y: torch.Tensor, rank: int, params: dict[str, Any]) -> float:
        """Residual reduction of a map fitted on the first part of the samples, measured on
        the rest (how linearly predictable the layer's pruning error is)."""
        n = x.shape[0]
        cut = round(n * (1.0 - float(params["holdout"])))
        if cut < 1 or cut >= n:
            return residual_gain(x, y, *fit_calibration(x, y, rank, float(params["ridge"])))
        down, up = fit_calibration(x[:cut], y[:cut], rank, float(params["ridge"]))
        return residual_gain(x[cut:], y[cut:], down, up)


@hookimpl
def prunebench_components() -> list[Component]:
    return [OlicaAttention(), OlicaFFN()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "olica",
            {
                "allocation": ComponentRef("uniform"),
                "attention": ComponentRef("olica"),
                "ffn": ComponentRef("olica"),
            },
            "Olica (He & Lin 2025): V/O orthogonal decomposition, Q/K weighted SVD, FFN pruning + linear calibration.",
        )
    ]
