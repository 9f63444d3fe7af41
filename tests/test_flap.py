"""FLAP: fluctuation scores, AL-AM allocation, bias compensation, GQA head removal."""

from __future__ import annotations

import pytest
import torch

from prunebench.baselines.flap import (
    FlapAllocation,
    FlapAttention,
    FlapFFN,
    FlapImportance,
    channel_metric,
    standardise,
)
from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import LayerContext, RunContext, embed, run_layer
from prunebench.harness.contracts import Allocation, Importance, LayerShape, ModelShape
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import model_shape, param_report
from prunebench.harness.pruned_model import PrunedForCausalLM
from prunebench.harness.runner import prune
from prunebench.harness.surgery import apply_attention_plan, apply_mlp_plan
from prunebench.harness.testing import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def _run(model: PrunedForCausalLM, ids: torch.Tensor, target: float = 0.3) -> RunContext:
    return RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=target)


def _ctx(model: PrunedForCausalLM, ids: torch.Tensor, index: int = 0, allocation: Allocation | None = None) -> LayerContext:
    hidden = embed(model, ids, 4, CPU)
    for layer in model.model.layers[:index]:
        hidden = run_layer(layer, model, hidden, 4)
    n = len(model.model.layers)
    return LayerContext(_run(model, ids), index, hidden, None, allocation or Allocation([0.0] * n, [0.0] * n))


def _kept_columns(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Which original columns a pruned weight kept (exact copies)."""
    return [int((old - new[:, [j]]).abs().sum(0).argmin()) for j in range(new.shape[1])]


def test_ffn_bias_is_the_removed_channels_mean_contribution(ids: torch.Tensor) -> None:
    model = to_pruned(tiny_model("llama-gqa"))
    ctx = _ctx(model, ids, index=1)
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    x = ctx.capture("down_in").to(torch.float64)  # [tokens, intermediate], independent of Moments
    mean_out_before = ctx.collect(["mlp_out"])["mlp_out"].mean
    plan = FlapFFN().compress_mlp(layer=ctx, ratio=0.5, params={"metric": "wifv", "multiple": 1, "compensate": True})
    kept = _kept_columns(plan.down.weight, w)
    removed = sorted(set(range(w.shape[1])) - set(kept))
    assert plan.intermediate == len(kept) == 48
    expected = torch.zeros(w.shape[0], dtype=torch.float64)
    for j in removed:
        expected += w[:, j].to(torch.float64) * x[:, j].mean()
    torch.testing.assert_close(plan.down.bias.to(torch.float64), expected, atol=1e-6, rtol=1e-5)
    apply_mlp_plan(model, 1, plan)
    after = ctx.collect(["mlp_out"])["mlp_out"].mean
    torch.testing.assert_close(after, mean_out_before, atol=1e-6, rtol=1e-5)
    # Without the bias the mean would be off by the removed contribution.
    assert expected.abs().max() > 1e-3
    bare = FlapFFN().compress_mlp(layer=_ctx(to_pruned(tiny_model("llama-gqa")), ids, index=1), ratio=0.5,
                                  params={"metric": "wifv", "multiple": 1, "compensate": False})
    assert bare.down.bias is None


def test_attention_bias_keeps_the_mean_output_and_kv_heads_follow(ids: torch.Tensor) -> None:
    model = to_pruned(tiny_model("llama-bias"))  # o_proj already has a bias: compensation adds to it
    n = len(model.model.layers)
    ctx = _ctx(model, ids, allocation=Allocation([0.5] * n, [0.0] * n, meta={"kept_heads": [1] * n}))
    old_bias = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    mean_before = ctx.collect(["attn_out"])["attn_out"].mean
    plan = FlapAttention().compress_attention(layer=ctx, ratio=0.5, params={"metric": "wifv", "compensate": True})
    assert len(plan.head_to_kv) == 1 and plan.num_kv_heads == 1  # 4 heads, 2 KV groups -> 1 head, 1 KV head
    o_in = ctx.capture("o_in").to(torch.float64)
    w = model.model.layers[0].self_attn.o_proj.weight.detach().to(torch.float64)
    kept = set(_kept_columns(plan.o.weight, w.to(plan.o.weight.dtype)))
    removed = [j for j in range(w.shape[1]) if j not in kept]
    expected = old_bias.to(torch.float64) + w[:, removed] @ o_in[:, removed].mean(0)
    torch.testing.assert_close(plan.o.bias.to(torch.float64), expected, atol=1e-6, rtol=1e-5)
    apply_attention_plan(model, 0, plan)
    torch.testing.assert_close(ctx.collect(["attn_out"])["attn_out"].mean, mean_before, atol=1e-6, rtol=1e-5)


def test_importance_is_the_dense_fluctuation_of_every_layer(ids: torch.Tensor) -> None:
    model = to_pruned(tiny_model("llama-gqa"))
    scores = FlapImportance().score_importance(run=_run(model, ids), params={"metric": "wifv", "attention_power": 2.0})
    plain = FlapImportance().score_importance(run=_run(model, ids), params={"metric": "wifv", "attention_power": 1.0})
    for index in range(2):
        stats = _ctx(model, ids, index).collect(["o_in", "down_in"])
        layer = model.model.layers[index]
        o_ref = stats["o_in"].variance * layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
        d_ref = stats["down_in"].variance * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
        torch.testing.assert_close(plain.attention[index], o_ref)
        torch.testing.assert_close(scores.attention[index], o_ref.pow(2))  # the reference's extra square
        torch.testing.assert_close(scores.mlp[index], d_ref)
    assert channel_metric("ifv", layer.mlp.down_proj.weight, stats["down_in"]).equal(stats["down_in"].variance)


def _shape(layers: int = 2, heads: int = 4, kv: int = 2, dim: int = 16, hidden: int = 64, inter: int = 96) -> ModelShape:
    att = (heads + kv) * 2 * dim * hidden
    return ModelShape([LayerShape(hidden, heads, kv, dim, dim, inter, att, 3 * inter * hidden) for _ in range(layers)])


def _kept_params(shape: ModelShape, alloc: Allocation) -> float:
    return shape.decoder_params - alloc.removed_params(shape)


def test_al_am_meets_the_budget_and_ranks_by_z_score() -> None:
    shape = _shape()
    g = torch.Generator().manual_seed(0)
    imp = Importance([torch.rand(64, generator=g) for _ in range(2)], [torch.rand(96, generator=g) for _ in range(2)])
    alloc = FlapAllocation().allocate_ratios(importance=imp, target=0.4, shape=shape, params={})
    head_cost, channel_cost = 2 * 16 * 64, 3 * 64
    assert abs(_kept_params(shape, alloc) - 0.6 * shape.decoder_params) <= 2 * head_cost
    # Standardisation per layer and module: rescaling one layer's scores changes nothing.
    scaled = Importance([imp.attention[0] * 1000, imp.attention[1]], [imp.mlp[0], imp.mlp[1] * 1e-3 + 5])
    again = FlapAllocation().allocate_ratios(importance=scaled, target=0.4, shape=shape, params={})
    assert again.meta["kept_heads"] == alloc.meta["kept_heads"]
    assert again.meta["kept_channels"] == alloc.meta["kept_channels"]
    # A layer whose channels stand out (high z) keeps more of them.
    skewed = Importance(imp.attention, [imp.mlp[0], torch.cat((torch.full((80,), 10.0), torch.zeros(16)))])
    alloc = FlapAllocation().allocate_ratios(importance=skewed, target=0.4, shape=shape, params={})
    assert alloc.meta["kept_channels"][1] >= 80 > alloc.meta["kept_channels"][0]
    assert channel_cost < head_cost


def test_al_am_charges_a_kv_head_only_with_its_last_query_head() -> None:
    shape = _shape(layers=1)
    low, high = torch.full((16,), -5.0), torch.full((16,), 5.0)
    # Heads 0 and 1 (KV group 0) score lowest: removing both frees their KV head too.
    attention = [torch.cat((low, low - 0.1, high, high))]
    imp = Importance(attention, [torch.ones(96)])  # every channel z = 0, between the heads
    head, kv = 2 * 16 * 64, 2 * 16 * 64
    target = (2 * head + kv) / shape.decoder_params
    alloc = FlapAllocation().allocate_ratios(importance=imp, target=target, shape=shape, params={})
    assert alloc.meta["kept_heads"] == [2] and alloc.meta["kept_channels"] == [96]
    assert alloc.attention[0] == pytest.approx((2 * head + kv) / shape.layers[0].attention_params)


def test_al_am_needs_scores() -> None:
    with pytest.raises(Exception, match="importance"):
        FlapAllocation().allocate_ratios(importance=None, target=0.3, shape=_shape(), params={})


def test_standardise_handles_constant_scores() -> None:
    assert standardise(torch.ones(5)).abs().max() == 0
    z = standardise(torch.arange(5.0))
    assert float(z.mean()) == pytest.approx(0) and float(z.std()) == pytest.approx(1)


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_flap_recipe_end_to_end(kind: str, host: PluginHost, ids: torch.Tensor, tmp_path) -> None:
    model = to_pruned(tiny_model(kind))
    dense = param_report(model, model)["dense"]
    run = _run(model, ids, 0.4)
    outcome = prune(run, host.resolve("flap"), host, show_progress=False)
    report = param_report(dense, run.model)
    # The cut is one threshold on the ranking: within half the largest unit (a query head
    # with its KV head) of the target, plus the compensation biases.
    largest = 4 * 16 * 64
    assert report["achieved_sparsity"] == pytest.approx(0.4, abs=largest / 2 / dense["decoder"] + 0.005)
    assert outcome.allocation.meta["rule"] == "flap-al-am"
    shape = model_shape(run.model)
    assert [l.intermediate for l in shape.layers] == outcome.allocation.meta["kept_channels"]
    assert [l.num_heads for l in shape.layers] == outcome.allocation.meta["kept_heads"]
    assert all(l.mlp.down_proj.bias is not None for l in run.model.model.layers)
    with torch.no_grad():
        logits = run.model(ids).logits
    assert torch.isfinite(logits).all()
    run.model.save_pretrained(tmp_path)
    loaded = PrunedForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)


def test_flap_layer_components_work_without_global_scores(host: PluginHost, ids: torch.Tensor) -> None:
    """UL-UM: uniform ratios, fluctuation measured in the layer loop."""
    model = to_pruned(tiny_model("llama-gqa"))
    dense = param_report(model, model)["dense"]
    run = _run(model, ids, 0.3)
    prune(run, host.resolve("flap", ["importance=none", "allocation=uniform"]), host, show_progress=False)
    # Per layer, 4 heads in 2 KV groups: attention ratios come in steps of 1/6 to 1/2.
    assert param_report(dense, run.model)["achieved_sparsity"] == pytest.approx(0.3, abs=0.1)


@pytest.mark.real
def test_smollm2_small_flap(host: PluginHost) -> None:
    from prunebench.harness.data import calibration_batch, evaluation_windows, load_corpus
    from prunebench.harness.models import load_source_model
    from prunebench.harness.perplexity import perplexity

    src = load_source_model("smollm2-135m")
    corpus = load_corpus("wiki-offline")
    maxpos = src.model.config.max_position_embeddings
    calib = calibration_batch(src.tokenizer, corpus, 4, 128, 0, maxpos)
    windows = evaluation_windows(src.tokenizer, corpus, 4, 128, maxpos)
    model = to_pruned(src.model)
    dense = param_report(model, model)["dense"]
    dense_ppl = perplexity(model, windows, 4).ppl
    run = _run(model, calib, 0.2)
    prune(run, host.resolve("flap"), host, show_progress=False)
    assert param_report(dense, run.model)["achieved_sparsity"] == pytest.approx(0.2, abs=0.01)
    ppl = perplexity(run.model, windows, 4).ppl
    assert dense_ppl < ppl < 10 * dense_ppl
