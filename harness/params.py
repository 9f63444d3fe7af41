"""Parameter counting from the real tensors, and the sparsity definition.

Sparsity is the fraction of decoder-layer parameters removed: attention and MLP weights
and biases, plus everything a method adds inside the layers (shortcut matrices, factor
pairs, parallel branches). Embeddings, lm_head and norms are excluded (and reported
separately), as the papers compared here do.
"""

from __future__ import annotations

from torch import nn

from prunebench.harness.contracts import LayerShape, ModelShape
from prunebench.harness.pruned_model import PrunedDecoderLayer, PrunedForCausalLM, linear_spec_of


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def attention_params(layer: PrunedDecoderLayer) -> int:
    """q, k, v, o (weights, biases, factor pairs) plus the attention shortcut."""
    attn = layer.self_attn
    return sum(count(getattr(attn, f"{n}_proj")) for n in "qkvo") + count(layer.attn_shortcut)


def mlp_params(layer: PrunedDecoderLayer) -> int:
    """gate, up, down, the parallel branch, plus the MLP shortcut."""
    return count(layer.mlp) + count(layer.mlp_shortcut)


def decoder_params(model: PrunedForCausalLM) -> int:
    return sum(attention_params(l) + mlp_params(l) for l in model.model.layers)


def total_params(model: nn.Module) -> int:
    """Unique parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def attention_core_width(model: PrunedForCausalLM) -> int:
    """Per-token width of attention's own work, summed over layers: query heads x (qk + v
    dims) sets the cost of the score and value products against the context. Projections
    can shrink (low rank, fewer inputs) while this stays: then attention's cost at long
    context does not shrink."""
    return sum(l.self_attn.num_heads * (l.self_attn.qk_dim + l.self_attn.v_dim) for l in model.model.layers)


def kv_cache_width(model: PrunedForCausalLM) -> int:
    """Values the KV cache holds per token, summed over layers: KV heads x (qk + v dims)."""
    return sum(l.self_attn.num_kv_heads * (l.self_attn.qk_dim + l.self_attn.v_dim) for l in model.model.layers)


def model_shape(model: PrunedForCausalLM) -> ModelShape:
    """Current sizes and parameter counts of every layer (what allocation needs)."""
    layers = []
    for layer in model.model.layers:
        attn = layer.self_attn
        layers.append(
            LayerShape(
                hidden=model.config.hidden_size,
                num_heads=attn.num_heads,
                num_kv_heads=attn.num_kv_heads,
                qk_dim=attn.qk_dim,
                v_dim=attn.v_dim,
                intermediate=layer.mlp.intermediate,
                attention_params=attention_params(layer),
                mlp_params=mlp_params(layer),
            )
        )
    return ModelShape(layers)


def removed_fraction(dense_decoder: int, decoder: int) -> float:
    """The sparsity definition: the fraction of the dense decoder-layer parameters removed."""
    return 1.0 - decoder / dense_decoder


def param_report(dense: PrunedForCausalLM | dict, pruned: PrunedForCausalLM) -> dict:
    """The ``params`` and ``sparsity.achieved`` numbers of a result, from real tensors."""
    d = dense if isinstance(dense, dict) else {"decoder": decoder_params(dense), "total": total_params(dense)}
    p = {"decoder": decoder_params(pruned), "total": total_params(pruned)}
    return {"dense": d, "pruned": p, "achieved_sparsity": removed_fraction(d["decoder"], p["decoder"])}


def paper_count_sparsity(dense: PrunedForCausalLM, pruned: PrunedForCausalLM) -> float | None:
    """The sparsity a per-head / per-neuron count claims (the IntraSlice and SoBP papers'
    accounting), next to the real one counted from tensors.

    Each layer is priced as the papers price it: a query head costs its q and o rows plus
    its *fractional* share of k and v (2 * (G / H) of a head's rows), so removing a head
    whose KV head survives is credited with K/V parameters that were not removed; an FFN
    neuron costs 3 * hidden. A layer's attention counts as the fraction of o_proj input
    dims removed (whole heads, or dims of compressed heads), its FFN as the fraction of
    neurons removed. None when the comparison means nothing: a transform changed the
    residual width, or a layer holds factor pairs, shortcuts or a parallel branch.
    """
    if pruned.config.hidden_size != dense.config.hidden_size:
        return None
    removed = total = 0.0
    for d_layer, p_layer in zip(dense.model.layers, pruned.model.layers):
        if p_layer.attn_shortcut is not None or p_layer.mlp_shortcut is not None or getattr(p_layer.mlp, "branch", None) is not None:
            return None
        if any(linear_spec_of(getattr(p_layer.self_attn, f"{n}_proj")).get("rank") for n in "qkvo"):
            return None
        if any(linear_spec_of(getattr(p_layer.mlp, f"{n}_proj")).get("rank") for n in ("gate", "up", "down")):
            return None
        d_attn, p_attn = d_layer.self_attn, p_layer.self_attn
        hidden, heads, kv = dense.config.hidden_size, d_attn.num_heads, d_attn.num_kv_heads
        per_head = hidden * (d_attn.qk_dim + d_attn.v_dim) * (1.0 + kv / heads)  # q + o, and 2 * (G / H) of k, v
        o_dims, kept_o = heads * d_attn.v_dim, p_attn.num_heads * p_attn.v_dim
        per_neuron = 3 * hidden
        removed += (1.0 - kept_o / o_dims) * heads * per_head + (d_layer.mlp.intermediate - p_layer.mlp.intermediate) * per_neuron
        total += heads * per_head + d_layer.mlp.intermediate * per_neuron
    return removed / total if total else None
