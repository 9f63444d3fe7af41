"""Parameter counting from the real tensors, and the sparsity definition.

Sparsity is the fraction of decoder-layer parameters removed: attention and MLP weights
and biases, plus everything a method adds inside the layers (shortcut matrices, factor
pairs, parallel branches). Embeddings, lm_head and norms are excluded (and reported
separately), as the papers compared here do.
"""

from __future__ import annotations

from torch import nn

from prunebench.harness.contracts import LayerShape, ModelShape
from prunebench.harness.pruned_model import PrunedDecoderLayer, PrunedForCausalLM


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


def param_report(dense: PrunedForCausalLM | dict, pruned: PrunedForCausalLM) -> dict:
    """The ``params`` and ``sparsity.achieved`` numbers of a result, from real tensors."""
    d = dense if isinstance(dense, dict) else {"decoder": decoder_params(dense), "total": total_params(dense)}
    p = {"decoder": decoder_params(pruned), "total": total_params(pruned)}
    return {"dense": d, "pruned": p, "achieved_sparsity": 1.0 - p["decoder"] / d["decoder"]}
