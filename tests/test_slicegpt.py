"""SliceGPT transform: norm fusion, rotation, slicing, shortcut accounting."""

from __future__ import annotations

import pytest
import torch

from prunebench.baselines.slicegpt import (
    fuse_norms,
    sliced_decoder_params,
    width_for_slicing,
    width_for_sparsity,
)
from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import RunContext
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import decoder_params, param_report
from prunebench.harness.pruned_model import PrunedForCausalLM
from prunebench.harness.runner import prune
from prunebench.harness.testing import tiny_model

KINDS = ["llama-mha", "llama-gqa", "llama-bias", "phi3", "phi3-partial"]


@pytest.fixture(scope="module")
def host() -> PluginHost:
    return PluginHost()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def _logits(model: PrunedForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _slice(host: PluginHost, model: PrunedForCausalLM, ids: torch.Tensor, target: float, *sets: str):
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=target)
    outcome = prune(run, host.resolve("slicegpt", list(sets)), host, show_progress=False)
    return run.model, outcome.transform


@pytest.mark.parametrize("kind", KINDS)
def test_norm_fusion_keeps_the_logits(kind: str, ids: torch.Tensor) -> None:
    model = to_pruned(tiny_model(kind))
    before = _logits(model, ids)
    fuse_norms(model)
    layer = model.model.layers[0]
    assert layer.input_layernorm.weight is None and model.model.norm.weight is None
    assert model.config.norm_has_weight is False
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


def test_fusion_unties_a_tied_head(ids: torch.Tensor) -> None:
    model = to_pruned(tiny_model("llama-gqa"))
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    embed_before = model.model.embed_tokens.weight.detach().clone()
    before = _logits(model, ids)
    assert fuse_norms(model)["untied_lm_head"] is True
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(model.model.embed_tokens.weight, embed_before)
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_slicing_zero_reproduces_dense_logits(kind: str, host: PluginHost, ids: torch.Tensor) -> None:
    dense = to_pruned(tiny_model(kind))
    before = _logits(dense, ids)
    sliced, summary = _slice(host, dense, ids, 0.3, "transform.slicing=0")
    assert sliced is not dense and summary["width"] == 64
    assert all(l.attn_shortcut is not None and l.mlp_shortcut is not None for l in sliced.model.layers)
    # Rotated, not identity: the embeddings really moved to the PCA basis.
    assert not torch.allclose(sliced.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    torch.testing.assert_close(_logits(sliced, ids), before, atol=1e-4, rtol=1e-4)


def _low_rank_residual(rank: int, seed: int = 1) -> PrunedForCausalLM:
    """A model whose residual stream lives in a ``rank``-dim subspace: embeddings and every
    writer (o_proj, down_proj) are projected onto it, so slicing to ``rank`` is exact."""
    model = to_pruned(tiny_model("llama-gqa"))
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(64, rank, generator=g, dtype=torch.float64))
    proj = (basis @ basis.T).to(torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ proj)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(proj @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(proj @ layer.mlp.down_proj.weight)
    return model


def test_slicing_is_exact_when_the_residual_has_low_rank(host: PluginHost, ids: torch.Tensor) -> None:
    model = _low_rank_residual(40)
    before = _logits(model, ids)
    sliced, summary = _slice(host, model, ids, 0.3, "transform.slicing=0.375")
    assert summary["width"] == 40 and sliced.config.hidden_size == 40 and sliced.config.norm_dim == 64
    torch.testing.assert_close(_logits(sliced, ids), before, atol=1e-4, rtol=1e-4)
    # One dimension fewer than the subspace loses information: the check above can fail.
    narrower, _ = _slice(host, _low_rank_residual(40), ids, 0.3, "transform.slicing=0.5")
    assert (_logits(narrower, ids) - before).abs().max() > 1e-2


def test_shortcut_matrices_are_counted(host: PluginHost, ids: torch.Tensor) -> None:
    dense = to_pruned(tiny_model("llama-gqa"))
    counts = param_report(dense, dense)["dense"]
    predicted = sliced_decoder_params(dense, 40)
    sliced, summary = _slice(host, dense, ids, 0.3, "transform.slicing=0.375")
    w = summary["width"]
    shortcuts = sum(l.attn_shortcut.weight.numel() + l.mlp_shortcut.weight.numel() for l in sliced.model.layers)
    assert shortcuts == 2 * w * w * 2 == summary["shortcut_params"]
    assert decoder_params(sliced) == predicted
    without = decoder_params(sliced) - shortcuts
    assert without == sum(
        sum(p.numel() for p in l.self_attn.parameters()) + sum(p.numel() for p in l.mlp.parameters())
        for l in sliced.model.layers
    )
    report = param_report(counts, sliced)
    assert report["achieved_sparsity"] == pytest.approx(summary["parameter_sparsity"])
    assert report["achieved_sparsity"] < 1 - without / counts["decoder"]


def test_width_is_nearest_to_the_parameter_target(host: PluginHost, ids: torch.Tensor) -> None:
    dense = to_pruned(tiny_model("llama-mha"))
    total = decoder_params(dense)
    width = width_for_sparsity(dense, 0.3, 8)
    gap = lambda w: abs(1 - sliced_decoder_params(dense, w) / total - 0.3)
    assert width % 8 == 0 and all(gap(width) <= gap(w) for w in range(8, 65, 8))
    _, summary = _slice(host, dense, ids, 0.3)
    assert summary["width"] == width and summary["slicing"] == pytest.approx(1 - width / 64)
    assert summary["parameter_sparsity"] == pytest.approx(0.3, abs=0.05)


def test_small_slicing_adds_parameters_and_says_so(host: PluginHost, ids: torch.Tensor) -> None:
    assert width_for_slicing(64, 0.1, 8) == 56
    _, summary = _slice(host, to_pruned(tiny_model("llama-gqa")), ids, 0.0, "transform.slicing=0.1")
    assert summary["parameter_sparsity"] < 0 and "note" in summary
    with pytest.raises(Exception, match="slicing"):
        width_for_slicing(64, 1.0, 8)


def test_sliced_model_saves_and_loads(host: PluginHost, ids: torch.Tensor, tmp_path) -> None:
    sliced, _ = _slice(host, to_pruned(tiny_model("phi3")), ids, 0.3)
    sliced.save_pretrained(tmp_path)
    loaded = PrunedForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.norm.weight is None and loaded.config.norm_dim == 64
    torch.testing.assert_close(_logits(loaded, ids), _logits(sliced, ids))


@pytest.mark.real
def test_smollm2_small_slice(host: PluginHost) -> None:
    from prunebench.harness.data import calibration_batch, evaluation_windows, load_corpus
    from prunebench.harness.models import load_source_model
    from prunebench.harness.perplexity import perplexity

    src = load_source_model("smollm2-135m")
    corpus = load_corpus("wiki-offline")
    maxpos = src.model.config.max_position_embeddings
    # PCA of a 576-wide residual stream needs more calibration tokens than its width.
    calib = calibration_batch(src.tokenizer, corpus, 8, 256, 0, maxpos)
    windows = evaluation_windows(src.tokenizer, corpus, 4, 128, maxpos)
    dense = to_pruned(src.model)
    dense_ppl = perplexity(dense, windows, 4).ppl
    sliced, summary = _slice(host, dense, calib, 0.2)
    assert summary["untied_lm_head"] is True and summary["width"] % 8 == 0
    assert summary["parameter_sparsity"] == pytest.approx(0.2, abs=0.02)
    ppl = perplexity(sliced, windows, 4).ppl
    assert dense_ppl < ppl < 10 * dense_ppl
