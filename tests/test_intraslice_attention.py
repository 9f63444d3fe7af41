"""Tests of the IntraSlice attention components (plugins/intraslice_attention.py).

Tiny random models (hidden 64, 4 heads of dim 16; GQA: 2 KV heads) exercise MHA, GQA,
biases and Phi-3's unfused projections; one small SmolLM2 check is marked ``real``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.budget import AttentionCost, plan_params
from prunebench.harness.context import LayerContext, RunContext, embed, position_ids
from prunebench.harness.contracts import AttentionPlan, LinearWeights
from prunebench.harness.params import attention_params
from prunebench.harness.surgery import apply_attention_plan, attention_plan_of, build_attention, keep_heads
from prunebench.harness.testing import tiny_model
from prunebench.plugins.intraslice_attention import (
    HeadPrune,
    IntraSliceHeadPCA,
    group_spectra,
    head_spectra,
    o_map_back,
    pre_delete_heads,
    ridge_damping,
    split_dims,
)

PCA = IntraSliceHeadPCA()
HEAD_PRUNE = HeadPrune()


def _layer(kind: str, index: int = 0, tokens: int = 32, seqs: int = 8) -> LayerContext:
    model = to_pruned(tiny_model(kind))
    ids = torch.randint(0, 96, (seqs, tokens), generator=torch.Generator().manual_seed(0))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    return LayerContext(run, index, embed(model, ids, 4, torch.device("cpu")), importance=None, allocation=None)


def _params(**over) -> dict:
    return {**PCA.defaults, **over}


def _attn_out(module: torch.nn.Module, ctx: LayerContext) -> torch.Tensor:
    """Attention output of ``module`` on the layer's normed calibration inputs."""
    x = ctx.layer.input_layernorm(ctx.inputs)
    freqs = ctx.model.model.rotary_freqs(position_ids(x.shape[1], x.device))
    with torch.no_grad():
        return module(x, freqs, None, None)


# ----- ratio 0 is the dense layer ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_ratio_zero_equals_dense(kind: str) -> None:
    ctx = _layer(kind)
    before = ctx.outputs()
    plan = PCA.compress_attention(layer=ctx, ratio=0.0, params=_params())
    attn = ctx.layer.self_attn
    assert (len(plan.head_to_kv), plan.qk_dim, plan.v_dim) == (attn.num_heads, attn.qk_dim, attn.v_dim)
    # The full path ran: v/o went through a PCA basis (not the identity) and Q_2*.
    assert not torch.allclose(plan.v.weight, attn.v_proj.weight)
    apply_attention_plan(ctx.model, ctx.index, plan)
    assert (ctx.outputs() - before).abs().max().item() < 1e-4


# ----- greedy head removal -------------------------------------------------------------------
def test_zero_output_head_is_removed_mha() -> None:
    ctx = _layer("llama-mha")
    attn = ctx.layer.self_attn
    with torch.no_grad():
        attn.v_proj.weight[2 * attn.v_dim : 3 * attn.v_dim] = 0  # head 2 outputs exactly zero
    plan = PCA.compress_attention(layer=ctx, ratio=0.3, params=_params())
    assert plan.summary["removed_heads"] == [2]
    # Without the zero head nothing is removed at this ratio: the removal above is the greedy step's.
    plain = PCA.compress_attention(layer=_layer("llama-mha"), ratio=0.3, params=_params())
    assert plain.summary["removed_heads"] == []


def test_zero_output_head_is_removed_gqa() -> None:
    ctx = _layer("llama-gqa")
    attn = ctx.layer.self_attn
    with torch.no_grad():
        attn.o_proj.weight[:, 1 * attn.v_dim : 2 * attn.v_dim] = 0  # head 1 contributes nothing
    plan = PCA.compress_attention(layer=ctx, ratio=0.3, params=_params())
    assert plan.summary["kept_heads"] == [0, 2, 3]
    assert plan.head_to_kv == [0, 1, 1] and plan.num_kv_heads == 2


# ----- uneven GQA groups --------------------------------------------------------------------
def _masked_layout(plan: AttentionPlan, dense: AttentionPlan, kept: list[int]) -> AttentionPlan:
    """The plan's tensors placed back in the original (uniform) head layout, with removed
    query heads masked to zero: the reference computation for uneven groups."""
    heads, groups, c, p = len(dense.head_to_kv), dense.num_kv_heads, plan.qk_dim, plan.v_dim
    d = dense.q.in_features
    kv_orig = sorted({dense.head_to_kv[h] for h in kept})
    q = torch.zeros(heads * c, d)
    o = torch.zeros(d, heads * p)
    for i, h in enumerate(kept):
        q[h * c : (h + 1) * c] = plan.q.weight[i * c : (i + 1) * c]
        o[:, h * p : (h + 1) * p] = plan.o.weight[:, i * p : (i + 1) * p]
    k, v = torch.zeros(groups * c, d), torch.zeros(groups * p, d)
    rope = plan.rope_index[:1].repeat(groups, 1)
    for j, g in enumerate(kv_orig):
        k[g * c : (g + 1) * c] = plan.k.weight[j * c : (j + 1) * c]
        v[g * p : (g + 1) * p] = plan.v.weight[j * p : (j + 1) * p]
        rope[g] = plan.rope_index[j]
    return AttentionPlan(
        head_to_kv=list(dense.head_to_kv), num_kv_heads=groups, qk_dim=c, v_dim=p, rope_index=rope,
        q=LinearWeights(weight=q), k=LinearWeights(weight=k), v=LinearWeights(weight=v), o=LinearWeights(weight=o),
    )


def test_uneven_groups_equal_masked_reference() -> None:
    ctx = _layer("llama-gqa")
    attn = ctx.layer.self_attn
    with torch.no_grad():
        attn.o_proj.weight[:, 1 * attn.v_dim : 2 * attn.v_dim] = 0
    dense = attention_plan_of(attn)
    plan = PCA.compress_attention(layer=ctx, ratio=0.3, params=_params())
    kept = plan.summary["kept_heads"]
    assert plan.head_to_kv == [0, 1, 1]  # uneven: one group keeps 1 head, the other 2
    pruned = build_attention(ctx.model, ctx.index, plan)[0]
    reference = build_attention(ctx.model, ctx.index, _masked_layout(plan, dense, kept))[0]
    assert not pruned.uniform_groups() and reference.uniform_groups()
    out, ref = _attn_out(pruned, ctx), _attn_out(reference, ctx)
    assert (out - ref).abs().max().item() < 1e-5
    # The masks matter: keeping head 1 in the reference changes the output.
    unmasked = _masked_layout(plan, dense, kept)
    unmasked.q.weight[1 * plan.qk_dim : 2 * plan.qk_dim] = unmasked.q.weight[0 : plan.qk_dim]
    unmasked.o.weight[:, 1 * plan.v_dim : 2 * plan.v_dim] = unmasked.o.weight[:, 0 : plan.v_dim]
    wrong = _attn_out(build_attention(ctx.model, ctx.index, unmasked)[0], ctx)
    assert (wrong - ref).abs().max().item() > 1e-3


# ----- the budget ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "llama-bias", "phi3-partial"])
@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7])
def test_parameter_count_meets_budget(kind: str, ratio: float) -> None:
    ctx = _layer(kind)
    dense = attention_plan_of(ctx.layer.self_attn)
    budget = (1 - ratio) * plan_params(dense)
    plan = PCA.compress_attention(layer=ctx, ratio=ratio, params=_params())
    apply_attention_plan(ctx.model, ctx.index, plan)
    real = attention_params(ctx.layer)
    assert real == plan_params(plan) <= budget
    costs = AttentionCost.of_plan(dense)
    heads, kv = len(plan.head_to_kv), plan.num_kv_heads
    slack = max(costs.per_vo_channel(heads, kv), 2 * costs.per_qk_channel(heads, kv))
    assert real > budget - slack
    assert plan.qk_dim >= 0.75 * dense.qk_dim
    assert torch.isfinite(ctx.outputs()).all()


def test_split_rules() -> None:
    plan = attention_plan_of(_layer("llama-mha").layer.self_attn)
    costs = AttentionCost.of_plan(plan)
    full = plan_params(plan)
    assert split_dims(costs, full, 4, 4, "equal", 0.75) == (16, 16)
    c, p = split_dims(costs, 0.9 * full, 4, 4, "equal", 0.75)
    assert c == 14 and p == 14  # same fraction of both per-head dims (pairs: even c)
    c, p = split_dims(costs, 0.9 * full, 4, 4, "qk-floor", 0.75)
    assert c == 12 and p > 14  # q/k at the floor, the rest to v/o
    c, p = split_dims(costs, 0.5 * full, 4, 4, "equal", 0.75)
    assert c == 12 and p < 8  # the floor binds: v/o pays for it


# ----- rotary pairs --------------------------------------------------------------------------
def test_kept_pairs_keep_original_frequencies() -> None:
    ctx = _layer("llama-gqa")
    dense = attention_plan_of(ctx.layer.self_attn)
    n = dense.rope_index.shape[1]
    plan = PCA.compress_attention(layer=ctx, ratio=0.3, params=_params())
    kept = plan.summary["kept_heads"]
    assert plan.rope_index.shape[1] < n  # some pairs were removed
    # Reference: the dense layer (kept heads, dense v/o) with the removed pairs' q/k rows zeroed.
    ref = keep_heads(dense, kept)
    qk = dense.qk_dim
    for g in range(ref.num_kv_heads):
        removed = [j for j in range(n) if j not in set(plan.rope_index[g].tolist())]
        rows = list(removed) + [j + n for j in removed]
        for r in rows:
            ref.k.weight[g * qk + r] = 0
            for h, kv in enumerate(ref.head_to_kv):
                if kv == g:
                    ref.q.weight[h * qk + r] = 0
    # The pruned q/k (kept pairs only, their rope_index) with the same dense v/o.
    mixed = replace(plan, v=ref.v, o=ref.o, v_dim=ref.v_dim)
    out = _attn_out(build_attention(ctx.model, ctx.index, mixed)[0], ctx)
    expected = _attn_out(build_attention(ctx.model, ctx.index, ref)[0], ctx)
    assert (out - expected).abs().max().item() < 1e-5
    # Sensitivity: the first m frequencies instead of the kept ones give another output.
    m = plan.rope_index.shape[1]
    shifted = replace(mixed, rope_index=torch.arange(m).repeat(plan.num_kv_heads, 1))
    if not torch.equal(shifted.rope_index, plan.rope_index):
        wrong = _attn_out(build_attention(ctx.model, ctx.index, shifted)[0], ctx)
        assert (wrong - expected).abs().max().item() > 1e-4


def test_pair_without_energy_is_removed() -> None:
    ctx = _layer("llama-gqa")
    attn = ctx.layer.self_attn
    n = attn.rope_pairs
    with torch.no_grad():
        for r in (3, 3 + n):  # pair 3 of KV head 0: k is zero, so it adds nothing to q.k
            attn.k_proj.weight[r] = 0
    plan = PCA.compress_attention(layer=ctx, ratio=0.3, params=_params())
    assert 3 not in plan.rope_index[0].tolist()
    assert 3 in attention_plan_of(attn).rope_index[0].tolist()


# ----- compensation --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa"])
def test_least_squares_map_beats_transpose(kind: str) -> None:
    errors = {}
    for o_map in ("lsq", "transpose"):
        ctx = _layer(kind)
        target = _attn_out(ctx.layer.self_attn, ctx)
        plan = PCA.compress_attention(layer=ctx, ratio=0.4, params=_params(o_map=o_map))
        out = _attn_out(build_attention(ctx.model, ctx.index, plan)[0], ctx)
        errors[o_map] = (out - target).pow(2).sum().item()
    assert errors["lsq"] < 0.9 * errors["transpose"]


def test_unknown_parameter_value_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        PCA.compress_attention(layer=_layer("llama-mha"), ratio=0.3, params=_params(split="half"))
    with pytest.raises(ValueError, match="spectra"):
        PCA.compress_attention(layer=_layer("llama-mha"), ratio=0.3, params=_params(spectra="layer"))


# ----- the reference's shared dim (split="shared") ---------------------------------------------
REFERENCE = {"split": "shared", "pre_delete": True, "spectra": "head", "lsq_prior": "zero", "lsq_ridge_mean": "all"}


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "llama-bias", "phi3", "phi3-partial"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.45])
def test_shared_dim_respects_the_floor_and_the_budget(kind: str, ratio: float) -> None:
    ctx = _layer(kind)
    dense = attention_plan_of(ctx.layer.self_attn)
    costs = AttentionCost.of_plan(dense)
    budget = (1 - ratio) * plan_params(dense)
    plan = PCA.compress_attention(layer=ctx, ratio=ratio, params=_params(**REFERENCE))
    floor = costs.qk_floor(0.75)
    assert plan.qk_dim == plan.v_dim >= floor  # one common dim, never below the q/k floor
    pairs = plan.rope_index.shape[1]
    if costs.pass_dim == 0:
        assert plan.qk_dim == 2 * pairs  # whole rotary pairs only
    apply_attention_plan(ctx.model, ctx.index, plan)
    real = attention_params(ctx.layer)
    heads, kv = len(plan.head_to_kv), plan.num_kv_heads
    pair_step = 2 * (costs.per_qk_channel(heads, kv) + costs.per_vo_channel(heads, kv))
    assert real == plan_params(plan) and abs(real - budget) <= pair_step, (real, budget, pair_step)
    assert torch.isfinite(ctx.outputs()).all()


def test_shared_dim_forces_deletion_down_to_the_floor() -> None:
    """At 45% four MHA heads would get 8.8 dims < 12: the weakest heads go until the dim
    reaches the floor, and the kept heads spend the budget at a common dim."""
    ctx = _layer("llama-mha")
    plan = PCA.compress_attention(layer=ctx, ratio=0.45, params=_params(**REFERENCE))
    assert plan.summary["forced"] and len(plan.head_to_kv) < 4
    assert plan.qk_dim == plan.v_dim >= 12
    # the equal split keeps the floor on q/k only: v/o goes below it at this ratio
    equal = PCA.compress_attention(layer=_layer("llama-mha"), ratio=0.45, params=_params())
    assert equal.qk_dim >= 12 and equal.v_dim < 12


def test_pre_delete_heads_counts_top_channels() -> None:
    scores = torch.zeros(4 * 16, dtype=torch.float64)
    scores[0:16] = 10.0  # head 0: 16 strong channels
    scores[16:32] = 9.0  # head 1: 16
    scores[32:40] = 8.0  # head 2: 8 strong, 8 weak
    scores[48] = 7.0  # head 3: one strong channel (fewer than floor(floor(42 / 4) / 4) = 2)
    assert pre_delete_heads(scores, 4, 42) == [3]
    scores[49] = 7.0  # two channels: not fewer than 2 (strict), so kept
    assert pre_delete_heads(scores, 4, 42) == []
    assert pre_delete_heads(scores, 4, 0) == []


def test_pre_deletion_removes_a_head_whose_channels_are_all_weak() -> None:
    def weak_layer():
        ctx = _layer("llama-mha")
        attn = ctx.layer.self_attn
        with torch.no_grad():
            attn.o_proj.weight[:, 2 * attn.v_dim : 3 * attn.v_dim] *= 1e-3  # every channel of head 2 is weak
        return ctx

    plan = PCA.compress_attention(layer=weak_layer(), ratio=0.3, params=_params(**REFERENCE))
    assert plan.summary["pre_deleted"] == [2] and 2 not in plan.summary["kept_heads"]
    off = PCA.compress_attention(layer=weak_layer(), ratio=0.3, params=_params(**{**REFERENCE, "pre_delete": False}))
    assert off.summary["pre_deleted"] == []
    # the equal split with pre-deletion also starts without it
    equal = PCA.compress_attention(layer=weak_layer(), ratio=0.3, params=_params(pre_delete=True))
    assert equal.summary["pre_deleted"] == [2] and 2 not in equal.summary["kept_heads"]


# ----- KV-group spectra (spectra="kv-group") ------------------------------------------------------
def test_group_spectra_equal_head_spectra_under_mha_only() -> None:
    mha = _layer("llama-mha")
    o_in = mha.collect({"o_in": True})["o_in"]
    heads = head_spectra(o_in, 4)
    torch.testing.assert_close(group_spectra(o_in, [0, 1, 2, 3]), heads, rtol=0, atol=1e-12)
    plans = [PCA.compress_attention(layer=_layer("llama-mha"), ratio=0.3, params=_params(**{**REFERENCE, "spectra": s}))
             for s in ("head", "kv-group")]
    assert plans[0].summary["kept_heads"] == plans[1].summary["kept_heads"]
    assert all(torch.equal(getattr(plans[0], n).weight, getattr(plans[1], n).weight) for n in "qkvo")

    gqa = _layer("llama-gqa")
    o_in = gqa.collect({"o_in": True})["o_in"]
    grouped, own = group_spectra(o_in, [0, 0, 1, 1]), head_spectra(o_in, 4)
    assert not torch.allclose(grouped, own, atol=1e-6)
    assert bool((grouped <= own + 1e-12).all()), "a head's own eigenbasis captures the most of its energy"
    # head 1 by hand: its energy in the top-p eigenvectors of heads 0 + 1's summed covariance
    cov = o_in.covariance()
    c0, c1 = cov[0:16, 0:16], cov[16:32, 16:32]
    q = torch.linalg.eigh(c0 + c1).eigenvectors.flip(1)
    for p in (4, 12):
        expected = torch.trace(q[:, :p].T @ c1 @ q[:, :p]) / torch.trace(c1)
        assert float(grouped[1, p]) == pytest.approx(float(expected), rel=1e-10)


# ----- the map back: the reference's projector form ---------------------------------------------
def test_zero_prior_with_the_full_ridge_mean_is_the_reference_map() -> None:
    """lsq_prior="zero", lsq_ridge_mean="all": P Q_t of the reference (regress X on Z = X_r P
    in the full H*v space, ridge 1% of mean diag(Z^T Z) over all dims) = U M of Eq. 6."""
    gen = torch.Generator().manual_seed(0)
    heads, v, p, n = 4, 8, 5, 400
    head_to_kv, kept = [0, 0, 1, 1], [0, 2, 3]  # GQA, head 1 removed
    xr = torch.randn(n, heads * v, generator=gen, dtype=torch.float64) @ torch.randn(heads * v, heads * v, generator=gen,
                                                                                      dtype=torch.float64)
    x = xr + 0.3 * torch.randn(n, heads * v, generator=gen, dtype=torch.float64)
    xr[:, v : 2 * v] = 0  # the removed head outputs nothing in the pruned attention
    bases = torch.linalg.qr(torch.randn(2, v, v, generator=gen, dtype=torch.float64)).Q[:, :, :p]
    y_cols = torch.cat([xr[:, h * v : (h + 1) * v] for h in kept], 1)
    yy, yx = y_cols.T @ y_cols, y_cols.T @ x
    damping = ridge_damping(0.01, "all", len(kept) * p, heads * v)
    m = o_map_back(yy, yx, bases, kept, head_to_kv, heads, damping, "zero")  # [H p, H v]
    u = torch.zeros(heads * v, heads * p, dtype=torch.float64)
    for h in kept:
        u[h * v : (h + 1) * v, h * p : (h + 1) * p] = bases[head_to_kv[h]]
    z = xr @ u @ u.T
    a = z.T @ z
    a = a + 0.01 * a.diagonal().mean() * torch.eye(heads * v, dtype=torch.float64)
    reference = (u @ u.T) @ torch.linalg.solve(a, z.T @ x)
    torch.testing.assert_close(u @ m, reference, rtol=1e-8, atol=1e-10)
    stronger = o_map_back(yy, yx, bases, kept, head_to_kv, heads, ridge_damping(0.01, "kept", len(kept) * p, heads * v), "zero")
    assert not torch.allclose(u @ stronger, reference, rtol=1e-6)


# ----- head-prune ----------------------------------------------------------------------------
def test_head_prune_removes_lowest_heads_without_pca() -> None:
    ctx = _layer("llama-mha")
    attn = ctx.layer.self_attn
    with torch.no_grad():
        attn.v_proj.weight[1 * attn.v_dim : 2 * attn.v_dim] = 0
    dense = attention_plan_of(attn)
    plan = HEAD_PRUNE.compress_attention(layer=ctx, ratio=0.25, params={})
    assert plan.summary["kept_heads"] == [0, 2, 3]
    assert (plan.qk_dim, plan.v_dim) == (dense.qk_dim, dense.v_dim)
    assert torch.equal(plan.o.weight, torch.cat([dense.o.weight[:, h * 16 : (h + 1) * 16] for h in (0, 2, 3)], 1))
    assert HEAD_PRUNE.compress_attention(layer=ctx, ratio=0.0, params={}) is None


# ----- end to end ----------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["intraslice-head-pca", "head-prune"])
def test_runs_through_the_host(attention: str) -> None:
    from prunebench.harness.manager import PluginHost
    from prunebench.harness.runner import prune

    host = PluginHost()
    model = to_pruned(tiny_model("llama-gqa"))
    before = sum(attention_params(l) for l in model.model.layers)
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    recipe = host.resolve("wanda-sp", [f"attention={attention}", "ffn=keep", "allocation.attention=0.3", "allocation.ffn=0"])
    outcome = prune(run, recipe, host, show_progress=False)
    after = sum(attention_params(l) for l in model.model.layers)
    assert after < before and all("attention" in note for note in outcome.layers)
    assert torch.isfinite(model(ids).logits).all()


# ----- SmolLM2 -------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_layer_pca_beats_head_prune() -> None:
    from prunebench.harness.data import calibration_batch, load_corpus
    from prunebench.harness.models import load_source_model

    source = load_source_model("smollm2-135m")
    model = to_pruned(source.model)
    ids = calibration_batch(source.tokenizer, load_corpus("wiki-offline"), 4, 128, 0, 2048)
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    hidden = embed(model, ids, 4, torch.device("cpu"))
    for i in range(3):
        hidden = LayerContext(run, i, hidden, None, None).outputs()
    ctx = LayerContext(run, 3, hidden, importance=None, allocation=None)
    target = _attn_out(ctx.layer.self_attn, ctx)
    err = {}
    for name, comp, params in (("pca", PCA, _params()), ("head", HEAD_PRUNE, {})):
        plan = comp.compress_attention(layer=ctx, ratio=0.3, params=params)
        out = _attn_out(build_attention(ctx.model, ctx.index, plan)[0], ctx)
        err[name] = ((out - target).pow(2).sum() / target.pow(2).sum()).item()
    assert err["pca"] < err["head"]
