"""SoBP-style local structured OBS and SoBP's global allocation (baselines/sobp.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from prunebench.baselines.sobp import (
    SobpAttention,
    block_scores,
    obs_inverse_hessian,
    obs_prune_channels,
    obs_remove,
    reconstruction_error,
    sobp_allocation,
)
from prunebench.harness.adapters import to_pruned
from prunebench.harness.budget import channels_to_keep
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext, RunContext, embed
from prunebench.harness.contracts import Allocation, Importance, LayerShape, ModelShape
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.manager import PluginHost
from prunebench.harness.obs import greedy_channels
from prunebench.harness.params import decoder_params, param_report
from prunebench.harness.runner import prune
from prunebench.harness.surgery import (
    apply_attention_plan,
    apply_mlp_plan,
    attention_plan_of,
    keep_channels,
    keep_heads,
    mlp_plan_of,
)
from prunebench.harness.testing import tiny_model

CPU = torch.device("cpu")


class SyntheticImportance(Component):
    """Test-only importance: seeded random scores, layer 1 made unimportant."""

    kind, name = "importance", "test-synthetic"
    defaults: dict[str, Any] = {}

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> Importance:
        g = torch.Generator().manual_seed(0)
        shape = run.shape()
        att = [torch.rand(l.num_heads, generator=g) + 1.0 for l in shape.layers]
        mlp = [torch.rand(l.intermediate, generator=g) + 1.0 for l in shape.layers]
        att[1], mlp[1] = att[1] * 1e-3, mlp[1] * 1e-3
        return Importance(att, mlp)


class SyntheticPlugin:
    """A plugin module in miniature, providing the test-only importance component."""

    @hookimpl
    def prunebench_components(self) -> list[Component]:
        return [SyntheticImportance()]


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost(plugins=[SyntheticPlugin()])


def calibration(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(0))


def layer_context(kind: str) -> LayerContext:
    model = to_pruned(tiny_model(kind))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3, use_cache=False)
    n = len(model.model.layers)
    return LayerContext(run, 0, embed(model, ids, 4, CPU), None, Allocation([0.3] * n, [0.3] * n))


def site_error(ctx: LayerContext, site: str, reference: torch.Tensor) -> float:
    out = ctx.capture(site)
    return float((out - reference).pow(2).sum())


# ----- local OBS ------------------------------------------------------------------------------
def test_single_column_block_score_is_the_channel_score() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(2 * x.T @ x / 40)
    blocks = block_scores(w, hinv, [torch.tensor([j]) for j in range(7)])
    assert torch.allclose(blocks, w.pow(2).sum(0) / hinv.diagonal())


def naive_greedy(w: torch.Tensor, hinv: torch.Tensor, count: int) -> tuple[list[int], torch.Tensor]:
    """The textbook loop: score, remove the cheapest column, update W and H^-1 in place."""
    w, h = w.clone(), hinv.clone()
    alive, order = torch.ones(w.shape[1], dtype=torch.bool), []
    for _ in range(count):
        score = w.pow(2).sum(0) / h.diagonal().clamp_min(1e-300)
        score[~alive] = math.inf
        j = int(torch.argmin(score))
        row = h[j].clone()
        w -= torch.outer(w[:, j], row / row[j])
        h -= torch.outer(row, row / row[j])
        alive[j] = False
        order.append(j)
    return order, w


def test_factored_greedy_matches_the_textbook_loop() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(10, 30, generator=g, dtype=torch.float64)
    x = torch.randn(300, 30, generator=g, dtype=torch.float64) @ torch.randn(30, 30, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(2 * x.T @ x / 300)
    removed, new_w = greedy_channels(w, hinv, 20)
    order, ref_w = naive_greedy(w, hinv, 20)
    assert removed.tolist() == order
    assert torch.allclose(new_w, ref_w, atol=1e-9)


def test_greedy_sequential_updates_equal_the_joint_block_update() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    x = torch.randn(100, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(2 * x.T @ x / 100)
    removed, w_seq = greedy_channels(w, hinv, 5)
    w_joint, _ = obs_remove(w, hinv, removed)
    assert torch.allclose(w_seq, w_joint, atol=1e-9)
    # and the greedy first pick is the lowest single-column OBS error
    assert int(removed[0]) == int(torch.argmin(w.pow(2).sum(0) / hinv.diagonal()))


def test_obs_update_is_the_least_squares_optimum_of_the_kept_columns() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 9, generator=g, dtype=torch.float64)
    x = torch.randn(200, 9, generator=g, dtype=torch.float64)
    hinv = torch.linalg.inv(x.T @ x)
    removed = torch.tensor([1, 5, 6])
    kept = torch.tensor([0, 2, 3, 4, 7, 8])
    new_w, _ = obs_remove(w, hinv, removed)
    lstsq = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    assert torch.allclose(new_w[:, kept], lstsq, atol=1e-9)
    assert torch.all(new_w[:, removed] == 0)


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_obs_update_beats_plain_channel_removal(kind: str) -> None:
    ctx = layer_context(kind)
    reference = ctx.capture("mlp_out")
    stats = ctx.collect({"down_in": True})["down_in"]
    dense = mlp_plan_of(ctx.layer.mlp)
    keep = channels_to_keep(dense, 0.3, 8)
    plan, kept = obs_prune_channels(dense, obs_inverse_hessian(stats, 0.01), keep)
    assert len(kept) == plan.intermediate == keep
    plain = keep_channels(dense, kept)
    w = dense.down.weight.to(torch.float64)
    full_obs = torch.zeros_like(w)
    full_obs[:, kept] = plan.down.weight.to(torch.float64)
    full_plain = torch.zeros_like(w)
    full_plain[:, kept] = plain.down.weight.to(torch.float64)
    assert reconstruction_error(w, full_obs, stats.gram) < 0.9 * reconstruction_error(w, full_plain, stats.gram)
    # measured on the installed layer as well
    apply_mlp_plan(ctx.model, 0, plain)
    err_plain = site_error(ctx, "mlp_out", reference)
    apply_mlp_plan(ctx.model, 0, plan)
    assert site_error(ctx, "mlp_out", reference) < err_plain


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa"])
def test_block_obs_update_beats_plain_head_removal(kind: str) -> None:
    ctx = layer_context(kind)
    reference = ctx.capture("attn_out")
    plan = SobpAttention().compress_attention(layer=ctx, ratio=0.3, params=dict(SobpAttention.defaults))
    kept = plan.summary["kept_heads"]
    assert 0 < len(kept) < ctx.layer.self_attn.num_heads
    plain = keep_heads(attention_plan_of(ctx.layer.self_attn), kept)
    apply_attention_plan(ctx.model, 0, plain)
    err_plain = site_error(ctx, "attn_out", reference)
    apply_attention_plan(ctx.model, 0, plan)
    err_obs = site_error(ctx, "attn_out", reference)
    assert err_obs < 0.9 * err_plain


def test_inverse_hessian_is_damped_and_symmetric() -> None:
    ctx = layer_context("llama-gqa")
    stats = ctx.collect({"down_in": True})["down_in"]
    hinv = obs_inverse_hessian(stats, 0.01)
    h = 2 * stats.gram / stats.count
    h = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    assert torch.allclose(hinv, hinv.T)
    assert torch.allclose(hinv @ h, torch.eye(h.shape[0], dtype=h.dtype), atol=1e-6)


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_sobp_prunes_tiny_models(host: PluginHost, kind: str) -> None:
    dense = to_pruned(tiny_model(kind))
    model = to_pruned(tiny_model(kind))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3, use_cache=False)
    prune(run, host.resolve("sobp-exact"), host, show_progress=False)
    assert 0.25 <= param_report(dense, model)["achieved_sparsity"] <= 0.36
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# ----- SoBP's allocation ---------------------------------------------------------------------
def shape_of(layers: int = 4, heads: int = 8, kv: int = 2, head_dim: int = 16, d: int = 128, inter: int = 256) -> ModelShape:
    att = heads * head_dim * d * 2 + kv * head_dim * d * 2
    return ModelShape([LayerShape(d, heads, kv, head_dim, head_dim, inter, att, 3 * d * inter) for _ in range(layers)])


def removed_params(alloc: Allocation, shape: ModelShape) -> float:
    return alloc.removed_params(shape)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_allocation_meets_the_budget(target: float) -> None:
    shape = shape_of()
    g = torch.Generator().manual_seed(0)
    imp = Importance([torch.rand(8, generator=g) for _ in range(4)], [torch.rand(256, generator=g) for _ in range(4)])
    alloc = sobp_allocation(imp, target, shape)
    removed = removed_params(alloc, shape)
    unit = max(shape.layers[0].attention_params / 8, shape.layers[0].mlp_params / 256)
    assert target * shape.decoder_params <= removed + 1e-6
    assert removed <= target * shape.decoder_params + unit


def test_head_cost_follows_the_gqa_formula() -> None:
    shape = shape_of()
    d, h, kv, H = 128, 16, 2, 8
    assert shape.layers[0].attention_params / H == pytest.approx(2 * d * h + 2 * (kv / H) * d * h)


def test_every_layer_keeps_at_least_twenty_percent() -> None:
    shape = shape_of()
    g = torch.Generator().manual_seed(1)
    att = [torch.rand(8, generator=g) for _ in range(4)]
    mlp = [torch.rand(256, generator=g) for _ in range(4)]
    att[2], mlp[2] = att[2] * 0, mlp[2] * 0  # worthless layer
    alloc = sobp_allocation(Importance(att, mlp), 0.5, shape)
    assert alloc.meta["kept_heads"][2] == math.ceil(0.2 * 8)
    assert alloc.meta["kept_neurons"][2] == math.ceil(0.2 * 256)
    assert all(k >= 2 for k in alloc.meta["kept_heads"]) and all(k >= 52 for k in alloc.meta["kept_neurons"])
    assert alloc.attention[2] == max(alloc.attention) and alloc.mlp[2] == max(alloc.mlp)


def test_heads_and_neurons_compete_for_one_budget() -> None:
    """Unlike a fixed attention/FFN split, very important heads are all kept and the FFN pays."""
    shape = shape_of()
    g = torch.Generator().manual_seed(2)
    imp = Importance([100 + torch.rand(8, generator=g) for _ in range(4)], [torch.rand(256, generator=g) for _ in range(4)])
    alloc = sobp_allocation(imp, 0.3, shape)
    assert all(a == 0.0 for a in alloc.attention)
    assert all(m > 0.3 for m in alloc.mlp)
    flipped = Importance([torch.rand(8, generator=g) * 1e-3 for _ in range(4)], [100 + torch.rand(256, generator=g) for _ in range(4)])
    alloc = sobp_allocation(flipped, 0.3, shape)
    assert all(a > 0.3 for a in alloc.attention) and sum(alloc.mlp) < sum(alloc.attention)


def test_channel_scores_are_summed_into_heads() -> None:
    shape = shape_of()
    g = torch.Generator().manual_seed(3)
    channels = [torch.rand(8 * 16, generator=g) for _ in range(4)]
    mlp = [torch.rand(256, generator=g) for _ in range(4)]
    per_channel = sobp_allocation(Importance(channels, mlp), 0.3, shape)
    per_head = sobp_allocation(Importance([c.reshape(8, 16).sum(1) for c in channels], mlp), 0.3, shape)
    assert per_channel.attention == per_head.attention and per_channel.mlp == per_head.mlp


def test_allocation_needs_importance(host: PluginHost) -> None:
    with pytest.raises(UsageError):
        host.call("allocation", host.resolve("sobp-exact", ["allocation=sobp-global"]).components["allocation"],
                  importance=None, target=0.3, shape=shape_of())


def test_sobp_global_end_to_end_with_synthetic_importance(host: PluginHost) -> None:
    dense = to_pruned(tiny_model("llama-gqa"))
    model = to_pruned(tiny_model("llama-gqa"))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3, use_cache=False)
    recipe = host.resolve("sobp-exact", ["importance=test-synthetic", "allocation=sobp-global"])
    outcome = prune(run, recipe, host, show_progress=False)
    assert outcome.allocation.mlp[1] > outcome.allocation.mlp[0]  # the unimportant layer is cut more
    assert 0.25 <= param_report(dense, model)["achieved_sparsity"] <= 0.4
    assert decoder_params(model) < decoder_params(dense)


def test_sobp_global_with_mask_grad(host: PluginHost) -> None:
    """The SoBP recipe: mask-grad importance + sobp-global + local OBS."""
    assert host.resolve("sobp-exact").components["importance"].name == "mask-grad"
    dense = to_pruned(tiny_model("llama-gqa"))
    model = to_pruned(tiny_model("llama-gqa"))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3, use_cache=False)
    recipe = host.resolve("sobp-exact", ["importance=mask-grad", "allocation=sobp-global"])
    outcome = prune(run, recipe, host, show_progress=False)
    assert outcome.allocation.meta["rule"] == "sobp-global"
    assert 0.25 <= param_report(dense, model)["achieved_sparsity"] <= 0.4


@pytest.mark.real
def test_obs_beats_plain_removal_on_smollm2() -> None:
    from prunebench.harness.data import calibration_batch, load_corpus
    from prunebench.harness.models import load_source_model

    source = load_source_model("smollm2-135m")
    model = to_pruned(source.model)
    ids = calibration_batch(source.tokenizer, load_corpus("wiki-offline"), 4, 128, seed=0)
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3, use_cache=False)
    n = len(model.model.layers)
    ctx = LayerContext(run, 0, embed(model, ids, 4, CPU), None, Allocation([0.3] * n, [0.3] * n))
    reference = ctx.capture("mlp_out")
    stats = ctx.collect({"down_in": True})["down_in"]
    dense = mlp_plan_of(ctx.layer.mlp)
    plan, kept = obs_prune_channels(dense, obs_inverse_hessian(stats, 0.01), channels_to_keep(dense, 0.3, 8))
    apply_mlp_plan(ctx.model, 0, keep_channels(dense, kept))
    err_plain = site_error(ctx, "mlp_out", reference)
    apply_mlp_plan(ctx.model, 0, plan)
    assert site_error(ctx, "mlp_out", reference) < 0.9 * err_plain
