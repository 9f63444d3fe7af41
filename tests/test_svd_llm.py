"""SVD-LLM: whitened truncated SVD factor pairs (baselines/svd_llm.py)."""

from __future__ import annotations

import pytest
import torch

from prunebench.baselines.svd_llm import (
    compress_projection,
    plain_svd_factors,
    rank_for_ratio,
    whitened_factors,
    whitening_factor,
)
from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import LayerContext, RunContext, embed
from prunebench.harness.contracts import Allocation, LinearWeights
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import decoder_params, param_report
from prunebench.harness.pruned_model import LowRankLinear, PrunedForCausalLM
from prunebench.harness.runner import prune
from prunebench.harness.surgery import apply_attention_plan, apply_mlp_plan, attention_plan_of, mlp_plan_of
from prunebench.harness.testing import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


def calibration(n: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def layer_context(kind: str, target: float = 0.3) -> LayerContext:
    model = to_pruned(tiny_model(kind))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=target)
    n = len(model.model.layers)
    return LayerContext(run, 0, embed(model, ids, 4, CPU), None, Allocation([target] * n, [target] * n))


def error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X^T||_F^2 from X^T X."""
    d = (weight - approx).to(torch.float64)
    return float((d @ gram * d).sum())


@pytest.mark.parametrize("name,site", [("q", "attn_in"), ("k", "attn_in"), ("o", "o_in")])
def test_full_rank_factors_reproduce_the_projection(name: str, site: str) -> None:
    ctx = layer_context("llama-gqa")
    w = getattr(attention_plan_of(ctx.layer.self_attn), name).weight.to(torch.float64)
    chol = whitening_factor(ctx.collect({site: True})[site].gram)
    down, up = whitened_factors(w, chol, min(w.shape))
    assert down.shape == (min(w.shape), w.shape[1]) and up.shape == (w.shape[0], min(w.shape))
    assert torch.allclose(up @ down, w, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-bias", "phi3"])
def test_full_rank_layer_reproduces_the_dense_layer(kind: str) -> None:
    """Every projection as a full-rank factor pair: the layer's output does not change."""
    ctx = layer_context(kind)
    before = ctx.outputs()
    stats = ctx.collect({"attn_in": True, "o_in": True, "mlp_in": True, "down_in": True})
    chol = {s: whitening_factor(m.gram) for s, m in stats.items()}

    def full(w: LinearWeights, site: str) -> LinearWeights:
        down, up = whitened_factors(w.weight, chol[site], min(w.weight.shape))
        return LinearWeights(down=down.float(), up=up.float(), bias=w.bias)

    att = attention_plan_of(ctx.layer.self_attn)
    for name, site in (("q", "attn_in"), ("k", "attn_in"), ("v", "attn_in"), ("o", "o_in")):
        setattr(att, name, full(getattr(att, name), site))
    mlp = mlp_plan_of(ctx.layer.mlp)
    for name, site in (("gate", "mlp_in"), ("up", "mlp_in"), ("down", "down_in")):
        setattr(mlp, name, full(getattr(mlp, name), site))
    apply_attention_plan(ctx.model, 0, att)
    apply_mlp_plan(ctx.model, 0, mlp)
    assert isinstance(ctx.layer.self_attn.k_proj, LowRankLinear) and isinstance(ctx.layer.mlp.down_proj, LowRankLinear)
    assert torch.allclose(ctx.outputs(), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,site", [("q", "attn_in"), ("k", "attn_in"), ("v", "attn_in"), ("o", "o_in")])
def test_whitened_truncation_beats_plain_svd_on_activations(name: str, site: str) -> None:
    ctx = layer_context("llama-gqa")
    gram = ctx.collect({site: True})[site].gram
    w = getattr(attention_plan_of(ctx.layer.self_attn), name).weight.to(torch.float64)
    k = rank_for_ratio(*w.shape, 0.3)
    chol = whitening_factor(gram)
    down, up = whitened_factors(w, chol, k)
    pd, pu = plain_svd_factors(w, k)
    whitened, plain = error(w, up @ down, gram), error(w, pu @ pd, gram)
    assert whitened < plain
    # truncation-aware: the error is exactly the energy of the dropped singular values of W S
    sigma = torch.linalg.svdvals(w @ chol)
    assert whitened == pytest.approx(float(sigma[k:].pow(2).sum()), rel=1e-6)


def test_rank_formula_and_dense_fallback() -> None:
    assert rank_for_ratio(576, 576, 0.2) == int(576 * 576 * 0.8 / 1152)
    assert rank_for_ratio(192, 576, 0.3) == 100  # GQA k/v: floor(192*576*0.7/768)
    w = LinearWeights(weight=torch.randn(8, 6))
    chol = torch.eye(6, dtype=torch.float64)
    kept, rank = compress_projection(w, chol, 0.0)
    assert rank is None and kept is w
    new, rank = compress_projection(w, chol, 0.5)
    assert rank == 1 and new.num_params() <= 0.5 * 48


def test_cholesky_fallback_on_singular_gram() -> None:
    x = torch.randn(3, 6, dtype=torch.float64)  # fewer tokens than dims: X^T X is singular
    gram = x.T @ x
    chol = whitening_factor(gram)
    lifted = chol @ chol.T
    assert torch.isfinite(chol).all()
    assert torch.linalg.eigvalsh(lifted)[0] > 0
    assert torch.allclose(lifted, gram, atol=1e-4 * float(gram.diagonal().mean()))


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3"])
def test_prunes_tiny_models_and_counts_every_factor(host: PluginHost, kind: str, tmp_path) -> None:
    dense = to_pruned(tiny_model(kind))
    model = to_pruned(tiny_model(kind))
    ids = calibration()
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.3)
    outcome = prune(run, host.resolve("svd-llm"), host, show_progress=False)
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(proj, LowRankLinear)
    ranks = outcome.layers[0]["attention"]["ranks"]
    assert ranks["k"] == rank_for_ratio(layer.self_attn.k_proj.out_features, 64, 0.3)
    manual = sum(p.numel() for l in model.model.layers for n, p in l.named_parameters() if "norm" not in n)
    assert decoder_params(model) == manual
    achieved = param_report(dense, model)["achieved_sparsity"]
    assert 0.29 <= achieved <= 0.36  # floor() of tiny ranks removes a little more
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    loaded = PrunedForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, logits, atol=1e-5)


@pytest.mark.real
def test_whitened_beats_plain_on_smollm2_activations() -> None:
    from prunebench.harness.data import calibration_batch, load_corpus
    from prunebench.harness.models import load_source_model

    source = load_source_model("smollm2-135m")
    model = to_pruned(source.model)
    ids = calibration_batch(source.tokenizer, load_corpus("wiki-offline"), 4, 128, seed=0)
    run = RunContext(model=model, calibration=ids, batch_size=4, device=CPU, seed=0, target=0.2)
    n = len(model.model.layers)
    ctx = LayerContext(run, 0, embed(model, ids, 4, CPU), None, Allocation([0.2] * n, [0.2] * n))
    stats = ctx.collect({"attn_in": True, "mlp_in": True})
    cases = [(ctx.layer.self_attn.k_proj.weight, "attn_in"), (ctx.layer.mlp.up_proj.weight, "mlp_in")]
    for weight, site in cases:
        w = weight.detach().to(torch.float64)
        k = rank_for_ratio(*w.shape, 0.2)
        gram = stats[site].gram
        down, up = whitened_factors(w, whitening_factor(gram), k)
        pd, pu = plain_svd_factors(w, k)
        assert error(w, up @ down, gram) < 0.8 * error(w, pu @ pd, gram)
