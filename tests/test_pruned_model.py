"""The pruned-model format: conversion is exact, every optional part computes what it
claims, and save/reload gives identical logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from prunebench.harness.adapters import to_pruned
from prunebench.harness.contracts import LinearWeights
from prunebench.harness.pruned_model import PrunedForCausalLM
from prunebench.harness.surgery import apply_attention_plan, apply_mlp_plan, attention_plan_of, keep_heads, mlp_plan_of
from prunebench.harness.testing import tiny_model


def test_conversion_reproduces_dense_logits(tiny_pair, calib_ids):
    source, pruned = tiny_pair
    with torch.no_grad():
        diff = (source(calib_ids).logits - pruned(calib_ids).logits).abs().max().item()
    assert diff < 1e-4


def test_generation_with_kv_cache_matches_source(tiny_pair):
    source, pruned = tiny_pair
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = source.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_cache_is_returned_under_its_current_name(monkeypatch):
    """transformers 5.x renamed the output's ``past_key_values`` to ``cache`` and warns on
    every use of the old name; building the output with it warned on every forward."""
    import warnings

    from transformers.utils import generic

    logged: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *args: logged.append(str(msg)))
    pruned = to_pruned(tiny_model("llama-gqa"))
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        out = pruned(ids, use_cache=True)
        assert out.cache is not None and out.cache.get_seq_length() == 8
        assert pruned(ids, use_cache=False).cache is None
        pruned.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [m for m in logged if "deprecated" in m] == []


def test_left_padding_mask_matches_source():
    source = tiny_model("llama-gqa")
    pruned = to_pruned(source)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        a = source(ids, attention_mask=mask).logits
        b = pruned(ids, attention_mask=mask).logits
    assert (a[1] - b[1]).abs().max() < 1e-4
    assert (a[0, 4:] - b[0, 4:]).abs().max() < 1e-4


def _pruned_with_every_part() -> PrunedForCausalLM:
    """A model whose layer 0 has uneven GQA groups, a bias on o/down, low-rank q and a
    parallel MLP branch, and whose layer 1 has shortcut matrices."""
    model = to_pruned(tiny_model("llama-gqa"))
    g = torch.Generator().manual_seed(3)
    plan = keep_heads(attention_plan_of(model.model.layers[0].self_attn), [0, 1, 2])  # group 1 keeps one head
    d = model.config.hidden_size
    rank = 8
    plan.q = LinearWeights(down=torch.randn(rank, d, generator=g) * 0.1, up=torch.randn(plan.q.out_features, rank, generator=g) * 0.1)
    plan.o = LinearWeights(weight=plan.o.weight, bias=torch.randn(d, generator=g) * 0.1)
    apply_attention_plan(model, 0, plan)
    mplan = mlp_plan_of(model.model.layers[0].mlp)
    mplan.down = LinearWeights(weight=mplan.down.weight, bias=torch.randn(d, generator=g) * 0.1)
    mplan.branch = LinearWeights(down=torch.randn(4, d, generator=g) * 0.1, up=torch.randn(d, 4, generator=g) * 0.1)
    apply_mlp_plan(model, 0, mplan)
    layer1 = model.model.layers[1]
    model.config.layers[1]["attn"]["shortcut"] = True
    model.config.layers[1]["mlp"]["shortcut"] = True
    layer1.attn_shortcut = torch.nn.Linear(d, d, bias=False)
    layer1.mlp_shortcut = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        layer1.attn_shortcut.weight.copy_(torch.eye(d) + 0.05 * torch.randn(d, d, generator=g))
        layer1.mlp_shortcut.weight.copy_(torch.eye(d) + 0.05 * torch.randn(d, d, generator=g))
    return model


def _reference_layer(layer, x: torch.Tensor, model: PrunedForCausalLM) -> torch.Tensor:
    """The decoder layer computed by hand: explicit per-head loops, masks, RoPE."""
    attn = layer.self_attn
    seq = x.shape[1]
    pos = torch.arange(seq, dtype=torch.float32)
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(1, seq, attn.num_heads, attn.qk_dim)
    k = attn.k_proj(h).view(1, seq, attn.num_kv_heads, attn.qk_dim)
    v = attn.v_proj(h).view(1, seq, attn.num_kv_heads, attn.v_dim)
    n = attn.rope_pairs

    def rope(t, g):
        ang = pos[:, None] * model.model.inv_freq[attn.rope_index[g]][None, :]
        a, b = t[:, :n], t[:, n : 2 * n]
        c, s = ang.cos(), ang.sin()
        return torch.cat((a * c - b * s, b * c + a * s, t[:, 2 * n :]), dim=-1)

    outs = []
    causal = torch.ones(seq, seq).tril().bool()
    for head in range(attn.num_heads):
        g = int(attn.head_to_kv[head])
        qh, kh = rope(q[0, :, head], g), rope(k[0, :, g], g)
        scores = (qh @ kh.T) * attn.scale
        scores = scores.masked_fill(~causal, float("-inf"))
        outs.append(scores.softmax(-1) @ v[0, :, g])
    a_out = attn.o_proj(torch.cat(outs, dim=-1)[None])
    res = x if layer.attn_shortcut is None else layer.attn_shortcut(x)
    mid = res + a_out
    res = mid if layer.mlp_shortcut is None else layer.mlp_shortcut(mid)
    mlp = layer.mlp
    m_in = layer.post_attention_layernorm(mid)
    out = mlp.down_proj(mlp.act_fn(mlp.gate_proj(m_in)) * mlp.up_proj(m_in))
    if mlp.branch is not None:
        out = out + mlp.branch(m_in)
    return res + out


def test_every_optional_part_matches_a_reference_computation():
    model = _pruned_with_every_part()
    x = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    freqs = model.model.rotary_freqs(torch.arange(9)[None])
    with torch.no_grad():
        for layer in model.model.layers:
            got = layer(x, freqs)
            want = _reference_layer(layer, x, model)
            assert (got - want).abs().max() < 1e-5


def test_save_reload_gives_identical_logits(tmp_path, calib_ids):
    model = _pruned_with_every_part()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again, PrunedForCausalLM)
    with torch.no_grad():
        assert torch.equal(model(calib_ids).logits, again(calib_ids).logits)
    assert again.config.layers[0]["attn"]["head_to_kv"] == [0, 0, 1]


def test_kv_cache_decoding_equals_full_forward_on_uneven_groups():
    model = _pruned_with_every_part()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :11], use_cache=True)
        step = model(ids[:, 11:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert (full - step).abs().max() < 1e-5


def _uneven_head_dims(qk_pairs: int | None, v_keep: int | None) -> PrunedForCausalLM:
    """Layer 0 with its q/k narrowed to ``qk_pairs`` RoPE pairs per head and/or its v to
    ``v_keep`` channels per head (what IntraSlice and Olica produce: qk_dim != v_dim)."""
    model = to_pruned(tiny_model("llama-gqa"))
    plan = attention_plan_of(model.model.layers[0].self_attn)
    heads, groups = len(plan.head_to_kv), plan.num_kv_heads
    if v_keep is not None:
        vd = plan.v_dim
        rows = torch.cat([torch.arange(g * vd, g * vd + v_keep) for g in range(groups)])
        cols = torch.cat([torch.arange(h * vd, h * vd + v_keep) for h in range(heads)])
        plan.v = LinearWeights(weight=plan.v.weight[rows], bias=plan.v.bias)
        plan.o = LinearWeights(weight=plan.o.weight[:, cols], bias=plan.o.bias)
        plan.v_dim = v_keep
    if qk_pairs is not None:
        qd, n = plan.qk_dim, plan.rope_index.shape[1]
        assert qd == 2 * n  # full RoPE: [pair firsts | pair seconds]

        def per_head(count: int) -> torch.Tensor:
            return torch.cat([torch.cat((torch.arange(qk_pairs), n + torch.arange(qk_pairs))) + h * qd for h in range(count)])

        plan.q = LinearWeights(weight=plan.q.weight[per_head(heads)], bias=plan.q.bias)
        plan.k = LinearWeights(weight=plan.k.weight[per_head(groups)], bias=plan.k.bias)
        plan.rope_index = plan.rope_index[:, :qk_pairs].contiguous()
        plan.qk_dim = 2 * qk_pairs
    apply_attention_plan(model, 0, plan)
    return model


def test_uneven_head_dims_match_the_reference_and_the_cache():
    """qk_dim != v_dim either way: the padding that keeps SDPA on its fused kernel is exact."""
    dims = to_pruned(tiny_model("llama-gqa")).model.layers[0].self_attn
    full_pairs, full_v = dims.rope_pairs, dims.v_dim
    for qk_pairs, v_keep in ((None, full_v - 3), (full_pairs - 2, None)):
        model = _uneven_head_dims(qk_pairs, v_keep)
        attn = model.model.layers[0].self_attn
        assert attn.qk_dim != attn.v_dim
        x = torch.randn(1, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(6))
        freqs = model.model.rotary_freqs(torch.arange(9)[None])
        ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            got = model.model.layers[0](x, freqs)
            assert (got - _reference_layer(model.model.layers[0], x, model)).abs().max() < 1e-5
            full = model(ids).logits[:, -1]
            out = model(ids[:, :11], use_cache=True)
            step = model(ids[:, 11:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert (full - step).abs().max() < 1e-5
