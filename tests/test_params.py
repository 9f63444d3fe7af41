"""The paper-count sparsity (harness.params.paper_count_sparsity) against the real one
counted from tensors: a GQA query head removed while its KV head stays is credited with
K/V parameters that are still there; on MHA without biases whole heads and neurons price
the same either way; the count means nothing (None) once a layer holds factor pairs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.contracts import LinearWeights
from prunebench.harness.params import decoder_params, paper_count_sparsity, param_report
from prunebench.harness.surgery import (
    apply_attention_plan,
    apply_mlp_plan,
    attention_plan_of,
    keep_channels,
    keep_heads,
    mlp_plan_of,
)
from prunebench.harness.testing import tiny_model


def _pair(kind: str):
    return to_pruned(tiny_model(kind)), to_pruned(tiny_model(kind))


def _real(dense, pruned) -> float:
    return param_report(dense, pruned)["achieved_sparsity"]


def _drop_heads(model, layer: int, keep: list[int]) -> None:
    apply_attention_plan(model, layer, keep_heads(attention_plan_of(model.model.layers[layer].self_attn), keep))


def test_nothing_removed_is_zero_both_ways():
    dense, pruned = _pair("llama-gqa")
    assert paper_count_sparsity(dense, pruned) == 0.0 == _real(dense, pruned)


def test_a_gqa_head_removed_while_its_kv_head_stays_is_overcounted():
    dense, pruned = _pair("llama-gqa")  # 4 query heads of dim 16 on 2 KV heads, hidden 64
    _drop_heads(pruned, 0, [0, 1, 2])  # head 3 goes; KV head 1 stays (head 2 still reads it)
    attn = pruned.model.layers[0].self_attn
    assert attn.num_heads == 3 and attn.num_kv_heads == 2
    real, paper = _real(dense, pruned), paper_count_sparsity(dense, pruned)
    total = decoder_params(dense)
    assert real == pytest.approx(2 * 64 * 16 / total)  # its q rows and o columns only
    assert paper == pytest.approx(64 * 32 * 1.5 / total)  # q, o and a G/H share of k and v
    assert paper > real


def test_a_whole_gqa_group_removed_is_counted_alike():
    dense, pruned = _pair("llama-gqa")
    _drop_heads(pruned, 0, [0, 1])  # heads 2 and 3 and their KV head go
    assert pruned.model.layers[0].self_attn.num_kv_heads == 1
    assert paper_count_sparsity(dense, pruned) == pytest.approx(_real(dense, pruned), rel=1e-12)


def test_on_mha_whole_heads_are_priced_the_same_both_ways():
    dense, pruned = _pair("llama-mha")
    _drop_heads(pruned, 0, [0, 2])
    _drop_heads(pruned, 1, [1, 2, 3])
    real = _real(dense, pruned)
    assert real == pytest.approx(3 * 4 * 64 * 16 / decoder_params(dense))
    assert paper_count_sparsity(dense, pruned) == pytest.approx(real, rel=1e-12)


def test_on_mha_ffn_neurons_are_priced_the_same_both_ways():
    dense, pruned = _pair("llama-mha")
    _drop_heads(pruned, 0, [0, 1, 2])
    apply_mlp_plan(pruned, 1, keep_channels(mlp_plan_of(pruned.model.layers[1].mlp), list(range(0, 96, 2))))
    assert paper_count_sparsity(dense, pruned) == pytest.approx(_real(dense, pruned), rel=1e-12)


def test_biases_are_counted_only_by_the_real_count():
    dense, pruned = _pair("llama-bias")
    _drop_heads(pruned, 0, [0, 1])
    assert paper_count_sparsity(dense, pruned) != pytest.approx(_real(dense, pruned), rel=1e-6)


def _factor(w: LinearWeights, rank: int) -> LinearWeights:
    u, s, vh = torch.linalg.svd(w.weight, full_matrices=False)
    return LinearWeights(down=(s[:rank, None] * vh[:rank]).contiguous(), up=u[:, :rank].contiguous(), bias=w.bias)


def test_a_layer_with_attention_factor_pairs_has_no_paper_count():
    dense, pruned = _pair("llama-gqa")
    _drop_heads(pruned, 0, [0, 1, 2])
    plan = attention_plan_of(pruned.model.layers[1].self_attn)
    apply_attention_plan(pruned, 1, dataclasses.replace(plan, o=_factor(plan.o, 8)))
    assert paper_count_sparsity(dense, pruned) is None
    assert _real(dense, pruned) > 0  # the real count still applies


def test_a_layer_with_ffn_factor_pairs_has_no_paper_count():
    dense, pruned = _pair("llama-gqa")
    plan = mlp_plan_of(pruned.model.layers[0].mlp)
    apply_mlp_plan(pruned, 0, dataclasses.replace(plan, down=_factor(plan.down, 8)))
    assert paper_count_sparsity(dense, pruned) is None
