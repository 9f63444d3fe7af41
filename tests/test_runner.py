"""The layer-wise runner with Wanda-sp, the first method, on every family."""

from __future__ import annotations

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import RunContext
from prunebench.harness.errors import UsageError
from prunebench.harness.params import decoder_params, model_shape, param_report
from prunebench.harness.runner import prune
from prunebench.harness.testing import tiny_model


def _run(model, ids, target, host, method="wanda-sp", overrides=()):
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=target)
    return prune(run, host.resolve(method, list(overrides)), host, show_progress=False)


def test_sparsity_zero_reproduces_dense_logits(tiny_pair, calib_ids, host):
    source, model = tiny_pair
    _run(model, calib_ids, 0.0, host)
    with torch.no_grad():
        assert (source(calib_ids).logits - model(calib_ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("target", [0.2, 0.3, 0.5])
def test_wanda_sp_meets_target_on_every_family(tiny_pair, calib_ids, host, target):
    source, model = tiny_pair
    dense_decoder = decoder_params(to_pruned(source))
    _run(model, calib_ids, target, host)
    report = param_report(to_pruned(source), model)
    # Granularity of the tiny models: one head of 4 is 12% of a layer's attention.
    assert abs(report["achieved_sparsity"] - target) < 0.06
    # The count comes from the real tensors, and shapes agree with the config.
    assert report["pruned"]["decoder"] == decoder_params(model) < dense_decoder
    assert report["pruned"]["decoder"] == sum(l.attention_params + l.mlp_params for l in model_shape(model).layers)
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids).logits).all()


def test_same_seed_gives_bitwise_identical_weights(calib_ids, host):
    a, b = to_pruned(tiny_model("llama-gqa")), to_pruned(tiny_model("llama-gqa"))
    _run(a, calib_ids, 0.4, host)
    _run(b, calib_ids, 0.4, host)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gqa_kv_head_goes_only_with_its_last_query_head(calib_ids, host):
    model = to_pruned(tiny_model("llama-gqa"))
    _run(model, calib_ids, 0.0, host, overrides=["allocation.attention=0.45", "allocation.ffn=0"])
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.num_heads == 2  # nearest to 45% of this layer's attention parameters
        assert set(attn.head_to_kv.tolist()) == set(range(attn.num_kv_heads))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range_is_refused(calib_ids, host, bad):
    with pytest.raises(UsageError, match=r"sparsity must be in \[0, 1\)"):
        _run(to_pruned(tiny_model("llama-gqa")), calib_ids, bad, host)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    from prunebench.harness.errors import UnsupportedModelError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture GPT2LMHeadModel; supported: .*LlamaForCausalLM"):
        to_pruned(model)
