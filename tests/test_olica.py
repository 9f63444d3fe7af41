"""Olica: V/O orthogonal decomposition, Q/K weighted SVD, FFN linear calibration (baselines/olica.py)."""

from __future__ import annotations

import pytest
import torch

from prunebench.baselines.olica import (
    OlicaAttention,
    OlicaFFN,
    compress_vo,
    fit_calibration,
    plan_mlp_output,
    residual_gain,
    split_budget,
    vo_decomposition,
)
from prunebench.harness.adapters import to_pruned
from prunebench.harness.budget import plan_params
from prunebench.harness.context import LayerContext, RunContext, embed
from prunebench.harness.contracts import Allocation
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import decoder_params, param_report
from prunebench.harness.pruned_model import LowRankLinear
from prunebench.harness.runner import prune
from prunebench.harness.surgery import (
    apply_attention_plan,
    apply_mlp_plan,
    attention_plan_of,
    fuse_vo,
    keep_channels,
    mlp_plan_of,
)
from prunebench.harness.testing import tiny_model

CPU = torch.device("cpu")
FORCE_CALIBRATION = ["ffn.calibrated_fraction=1.0", "ffn.min_gain=-1e9"]


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


def calibration(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(0))


def layer_context(kind: str) -> LayerContext:
    model = to_pruned(tiny_model(kind))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3)
    n = len(model.model.layers)
    return LayerContext(run, 0, embed(model, ids, 4, CPU), None, Allocation([0.3] * n, [0.3] * n))


# ----- attention -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_vo_decomposition_preserves_the_layer_at_full_dim(kind: str) -> None:
    ctx = layer_context(kind)
    before = ctx.outputs()
    plan = attention_plan_of(ctx.layer.self_attn)
    basis, back = vo_decomposition(plan, ctx.collect(["o_in"])["o_in"].second_moment)
    assert basis.shape == (plan.num_kv_heads, plan.v_dim, plan.v_dim)  # one basis per KV group
    apply_attention_plan(ctx.model, 0, compress_vo(plan, basis, back, plan.v_dim))
    assert torch.allclose(ctx.outputs(), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa"])
def test_vo_truncation_beats_cutting_raw_v_dims(kind: str) -> None:
    ctx = layer_context(kind)
    reference = ctx.capture("attn_out")
    plan = attention_plan_of(ctx.layer.self_attn)
    basis, back = vo_decomposition(plan, ctx.collect(["o_in"])["o_in"].second_moment)
    p = plan.v_dim // 2
    apply_attention_plan(ctx.model, 0, compress_vo(plan, basis, back, p))
    err_olica = float((ctx.capture("attn_out") - reference).pow(2).sum())
    # the naive alternative: keep the p v-channels of highest output energy, drop the rest
    ctx2 = layer_context(kind)
    plan2 = attention_plan_of(ctx2.layer.self_attn)
    e = ctx2.collect(["o_in"])["o_in"].second_moment.reshape(len(plan2.head_to_kv), -1)
    sel = torch.zeros(plan2.num_kv_heads, plan2.v_dim, p, dtype=torch.float32)
    for g in range(plan2.num_kv_heads):
        heads = [h for h, kv in enumerate(plan2.head_to_kv) if kv == g]
        top = torch.argsort(e[heads].sum(0), descending=True)[:p]
        sel[g, top, torch.arange(p)] = 1.0
    apply_attention_plan(ctx2.model, 0, fuse_vo(plan2, sel))
    err_naive = float((ctx2.capture("attn_out") - reference).pow(2).sum())
    assert err_olica < err_naive


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_attention_meets_budget_and_counts_qk_factors(kind: str) -> None:
    ctx = layer_context(kind)
    dense = attention_plan_of(ctx.layer.self_attn)
    plan = OlicaAttention().compress_attention(layer=ctx, ratio=0.3, params=dict(OlicaAttention.defaults))
    assert plan.q.rank is not None and plan.k.rank is not None  # q/k are factor pairs
    p = plan.summary["v_dim"]
    assert p < dense.v_dim
    expected = plan.q.num_params() + plan.k.num_params() + plan.v.num_params() + plan.o.num_params()
    assert plan_params(plan) == expected
    q = plan.q.rank * (dense.q.in_features + dense.q.out_features) + (dense.q.bias.numel() if dense.q.bias is not None else 0)
    assert plan.q.num_params() == q
    assert 0.27 <= 1 - plan_params(plan) / plan_params(dense) <= 0.36
    # the split: q/k lose about qk_vo times what v/o lose
    vo_removed = dense.v.num_params() + dense.o.num_params() - plan.v.num_params() - plan.o.num_params()
    qk_removed = dense.q.num_params() + dense.k.num_params() - plan.q.num_params() - plan.k.num_params()
    assert 1.5 < qk_removed / vo_removed < 6


def test_budget_split_moves_excess_to_vo() -> None:
    ctx = layer_context("llama-mha")
    plan = attention_plan_of(ctx.layer.self_attn)
    p_low, rho_low = split_budget(plan, 0.3, 3.0, 0.9)
    p_cap, rho_cap = split_budget(plan, 0.6, 100.0, 0.5)
    assert rho_low == pytest.approx(0.45, abs=0.05) and p_low < plan.v_dim
    assert rho_cap <= 0.5 and p_cap < plan.v_dim // 2


# ----- FFN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_calibration_map_reduces_the_residual_it_is_fitted_on(kind: str) -> None:
    ctx = layer_context(kind)
    mlp = ctx.layer.mlp
    plan = mlp_plan_of(mlp)
    pruned = keep_channels(plan, torch.arange(48))
    x = ctx.capture("mlp_in")
    with torch.no_grad():
        y = mlp(x) - plan_mlp_output(pruned, x, mlp.act_fn)
    before = float(y.pow(2).sum())
    gains = []
    for rank in (2, 8, 64):
        down, up = fit_calibration(x, y, rank, 0.01)
        after = float((y.double() - x.double() @ (up @ down).T).pow(2).sum())
        assert after < before
        gains.append(residual_gain(x, y, down, up))
    assert gains[0] < gains[1] < gains[2]  # more rank, more of the residual explained


def test_plan_mlp_output_matches_the_installed_mlp() -> None:
    ctx = layer_context("llama-bias")
    plan = keep_channels(mlp_plan_of(ctx.layer.mlp), torch.arange(40))
    x = ctx.capture("mlp_in")
    apply_mlp_plan(ctx.model, 0, plan)
    with torch.no_grad():
        assert torch.allclose(ctx.layer.mlp(x), plan_mlp_output(plan, x, ctx.layer.mlp.act_fn), atol=1e-5)


def test_calibrated_layer_pays_for_its_branch() -> None:
    ctx = layer_context("llama-gqa")
    dense = mlp_plan_of(ctx.layer.mlp)
    params = dict(OlicaFFN.defaults, calibrated_fraction=1.0, min_gain=-1e9, rank_ratio=0.05, multiple=1)
    plan = OlicaFFN().compress_mlp(layer=ctx, ratio=0.3, params=params)
    assert plan.branch is not None and plan.summary["calibrated"]
    rank = round(0.05 * 64)
    assert plan.branch.rank == rank and plan.branch.num_params() == 2 * 64 * rank
    plain = OlicaFFN().compress_mlp(layer=ctx, ratio=0.3, params=dict(params, min_gain=1e9))
    assert plain.branch is None and plan.intermediate < plain.intermediate
    budget = 0.7 * plan_params(dense)
    per_channel = 3 * 64
    assert abs(plan_params(plan) - budget) <= per_channel and abs(plan_params(plain) - budget) <= per_channel


def test_calibration_slots_are_limited() -> None:
    model = to_pruned(tiny_model("llama-gqa", layers=4))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3)
    host = PluginHost()
    recipe = host.resolve("olica", ["ffn.calibrated_fraction=0.5", "ffn.min_gain=-1e9"])
    prune(run, recipe, host, show_progress=False)
    branches = [l.mlp.branch is not None for l in model.model.layers]
    assert branches == [True, True, False, False]


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_olica_prunes_tiny_models_and_counts_every_factor(host: PluginHost, kind: str) -> None:
    dense = to_pruned(tiny_model(kind))
    model = to_pruned(tiny_model(kind))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3)
    outcome = prune(run, host.resolve("olica", FORCE_CALIBRATION), host, show_progress=False)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LowRankLinear) and layer.mlp.branch is not None
    assert outcome.layers[0]["ffn"]["calibrated"]
    manual = sum(p.numel() for l in model.model.layers for n, p in l.named_parameters() if "norm" not in n)
    assert decoder_params(model) == manual  # includes q/k factors and the branch
    assert 0.26 <= param_report(dense, model)["achieved_sparsity"] <= 0.36
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.real
def test_calibration_on_smollm2_layer() -> None:
    from prunebench.harness.data import calibration_batch, load_corpus
    from prunebench.harness.models import load_source_model

    source = load_source_model("smollm2-135m")
    model = to_pruned(source.model)
    ids = calibration_batch(source.tokenizer, load_corpus("wiki-offline"), 4, 128, seed=0)
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3)
    n = len(model.model.layers)
    ctx = LayerContext(run, 0, embed(model, ids, 4, CPU), None, Allocation([0.3] * n, [0.3] * n))
    dense = mlp_plan_of(ctx.layer.mlp)
    params = dict(OlicaFFN.defaults, min_gain=-1e9)
    plan = OlicaFFN().compress_mlp(layer=ctx, ratio=0.3, params=params)
    assert plan.branch is not None and plan.branch.rank == round(0.03 * 576)
    assert plan.summary["fit_gain"] > 0
    assert plan_params(plan) <= 0.7 * plan_params(dense) + 4 * 3 * 576
