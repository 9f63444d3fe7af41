"""SVD-LLM (Wang et al., ICLR 2025): truncation-aware whitening, then truncated SVD.

Every linear projection W [m, n] of a layer is replaced by a factor pair. With X the
projection's calibration inputs (rows = tokens), the whitening matrix is the Cholesky
factor S of X^T X (lower triangular, X^T X = S S^T). Then

    W S = U Sigma V^T,   W_u = U_k sqrt(Sigma_k),   W_v = sqrt(Sigma_k) V_k^T S^-1,

so that ||(W - W_u W_v) X^T||_F^2 = sum_{i>k} sigma_i^2: truncating the i-th singular
value of W S costs exactly sigma_i^2 of output error on the calibration data (the
"truncation-aware" property), which plain SVD of W does not have.

Rank: for a parameter ratio r (the fraction of the projection's parameters removed),
k = floor(m n (1 - r) / (m + n)); when factoring saves nothing (k (m + n) >= m n) the
projection stays dense. Every projection of the module gets the module's ratio, so the
module meets its budget (biases aside, which stay on the ``up`` factor).

Inputs per projection, read through ``layer.collect`` on the canonical layer: q/k/v share
``attn_in``, o uses ``o_in``, gate/up share ``mlp_in``, down uses ``down_in``. k/v under
GQA are [kv * head_dim, d], not square: the rank formula and the factors use m and n as
they are (the reference code assumes square attention matrices).

Departures from the reference, and why:
* Statistics come from the harness's sequential layer loop: a layer is whitened with the
  activations of the already-compressed layers before it (the reference whitens every
  layer on the dense model at once). Within a layer the MLP is whitened after the
  attention is compressed, like every other method here.
* Gram matrices are accumulated in float64 (the reference accumulates in float32), and
  the Cholesky fallback adds (-lambda_min + eps * mean(diag)) I: eps is relative, so the
  fallback does not depend on the number of calibration tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext
from prunebench.harness.contracts import AttentionPlan, ComponentRef, LinearWeights, MLPPlan, Recipe
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.stats import damped
from prunebench.harness.surgery import attention_plan_of, mlp_plan_of


# ----- the decomposition ------------------------------------------------------------------
def dense_weight(w: LinearWeights) -> torch.Tensor:
    """The [out, in] matrix a plan's projection applies (a factor pair is multiplied out)."""
    return w.weight if w.weight is not None else w.up @ w.down


def whitening_factor(gram: torch.Tensor, eps: float = 1e-6, damping: float = 0.0) -> torch.Tensor:
    """Lower-triangular S with S S^T = X^T X (float64).

    ``damping`` (relative to mean(diag)) is added first (0 = the paper). If the Cholesky
    factorisation fails (X^T X singular: dead channels, fewer tokens than dims), the
    smallest eigenvalue is lifted to ``eps * mean(diag)``, as the reference does with an
    absolute 1e-6.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    if damping > 0:
        g = damped(g, damping)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return chol
    scale = float(g.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    lam_min = float(torch.linalg.eigvalsh(g)[0])
    lift = -lam_min + eps * scale
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(g + lift * eye)
        if int(info) == 0:
            return chol
        lift *= 10
    raise FloatingPointError("whitening matrix is not positive definite even after lifting its spectrum")


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """k = floor(m n (1 - r) / (m + n)): the rank whose factor pair has (1 - r) of W's params."""
    m, n = out_features, in_features
    return math.floor(m * n * (1.0 - ratio) / (m + n))


def whitened_factors(weight: torch.Tensor, chol: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) = (W_v [k, n], W_u [m, k]) with W_u W_v the truncation-aware rank-k map.

    W_v = sqrt(Sigma_k) V_k^T S^-1 is formed with a triangular solve, never an explicit
    inverse.
    """
    w = weight.to(torch.float64)
    s = chol.to(torch.float64)
    u, sigma, vh = torch.linalg.svd(w @ s, full_matrices=False)
    k = max(0, min(rank, sigma.numel()))
    root = sigma[:k].sqrt()
    up = u[:, :k] * root
    a = root[:, None] * vh[:k]  # [k, n]: sqrt(Sigma_k) V_k^T
    down = torch.linalg.solve_triangular(s, a, upper=False, left=False)  # a S^-1
    return down, up


def plain_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the plain truncated SVD of W (the baseline SVD-LLM improves on)."""
    u, sigma, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    root = sigma[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def compress_projection(w: LinearWeights, chol: torch.Tensor, ratio: float) -> tuple[LinearWeights, int | None]:
    """The projection with ``ratio`` of its parameters removed, and its rank (None: dense).

    Stays dense when the factor pair would not save parameters.
    """
    weight = dense_weight(w)
    m, n = weight.shape
    k = max(1, rank_for_ratio(m, n, ratio))
    if ratio <= 0 or k * (m + n) >= m * n:
        return w, None
    down, up = whitened_factors(weight, chol, k)
    dtype = weight.dtype
    bias = None if w.bias is None else w.bias.clone()
    return LinearWeights(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), bias=bias), k


def _chols(layer: LayerContext, sites: tuple[str, ...], params: dict[str, Any]) -> dict[str, torch.Tensor]:
    stats = layer.collect(dict.fromkeys(sites, True))
    return {s: whitening_factor(stats[s].gram, float(params["eps"]), float(params["damping"])) for s in sites}


# ----- components -------------------------------------------------------------------------
class SvdLlmAttention(Component):
    """SVD-LLM: every attention projection becomes a whitened truncated-SVD factor pair."""

    kind, name = "attention", "svd-llm"
    defaults = {"eps": 1e-6, "damping": 0.0}

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        attn = layer.layer.self_attn
        if ratio <= 0 or attn.num_heads == 0:
            return None
        chols = _chols(layer, ("attn_in", "o_in"), params)
        plan = attention_plan_of(attn)
        ranks: dict[str, int | None] = {}
        for name, site in (("q", "attn_in"), ("k", "attn_in"), ("v", "attn_in"), ("o", "o_in")):
            new, ranks[name] = compress_projection(getattr(plan, name), chols[site], ratio)
            setattr(plan, name, new)
        plan.summary = {"ranks": ranks}
        return plan


class SvdLlmFFN(Component):
    """SVD-LLM: gate, up and down become whitened truncated-SVD factor pairs."""

    kind, name = "ffn", "svd-llm"
    defaults = {"eps": 1e-6, "damping": 0.0}

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
        mlp = layer.layer.mlp
        if ratio <= 0 or mlp.intermediate == 0:
            return None
        chols = _chols(layer, ("mlp_in", "down_in"), params)
        plan = mlp_plan_of(mlp)
        ranks: dict[str, int | None] = {}
        for name, site in (("gate", "mlp_in"), ("up", "mlp_in"), ("down", "down_in")):
            new, ranks[name] = compress_projection(getattr(plan, name), chols[site], ratio)
            setattr(plan, name, new)
        plan.summary = {"ranks": ranks}
        return plan


@hookimpl
def prunebench_components() -> list[Component]:
    return [SvdLlmAttention(), SvdLlmFFN()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "svd-llm",
            {
                "allocation": ComponentRef("uniform"),
                "attention": ComponentRef("svd-llm"),
                "ffn": ComponentRef("svd-llm"),
            },
            "SVD-LLM (Wang et al. 2025): truncation-aware whitening + truncated SVD factor pairs, uniform ratio.",
        )
    ]
