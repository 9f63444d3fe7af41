"""Architecture adapters: read a dense transformers model into the harness format.

Each adapter knows how one family stores its projections (Llama's separate q/k/v and
gate/up, Phi-3's fused ``qkv_proj`` and ``gate_up_proj``). It is chosen by the model's
class (``isinstance``), never by a name string, and it is the only place that knows the
source layout: after conversion every plugin edits the same canonical layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from prunebench.harness.errors import UnsupportedModelError
from prunebench.harness.pruned_model import PrunedConfig, PrunedForCausalLM, linear_spec


@dataclass
class Projection:
    """One linear map read from the source: weight [out, in] and optional bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class LayerWeights:
    """The seven projections of one decoder layer, in the canonical (unfused) layout."""

    q: Projection
    k: Projection
    v: Projection
    o: Projection
    gate: Projection
    up: Projection
    down: Projection
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor


@dataclass
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int


def _proj(linear: nn.Linear, rows: slice | None = None) -> Projection:
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    return Projection(w.clone(), None if b is None else b.clone())


class ArchitectureAdapter(ABC):
    """Base adapter: subclasses name their model classes and say how to read a layer."""

    model_classes: ClassVar[tuple[type, ...]] = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes)

    def attention_shape(self, config) -> AttentionShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
        return AttentionShape(heads, config.num_key_value_heads or heads, head_dim, int(head_dim * partial))

    @abstractmethod
    def read_layer(self, layer: nn.Module, shape: AttentionShape) -> LayerWeights:
        """The layer's projections in the canonical layout (copies, not views)."""

    @staticmethod
    def _norms(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.input_layernorm.weight.detach().clone(), layer.post_attention_layernorm.weight.detach().clone()


class LlamaFamilyAdapter(ArchitectureAdapter):
    """Llama, SmolLM, Mistral, Qwen2 (q/k/v biases): separate projections."""

    def __init__(self) -> None:
        from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

        type(self).model_classes = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)

    def read_layer(self, layer: nn.Module, shape: AttentionShape) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        return LayerWeights(
            q=_proj(a.q_proj), k=_proj(a.k_proj), v=_proj(a.v_proj), o=_proj(a.o_proj),
            gate=_proj(m.gate_proj), up=_proj(m.up_proj), down=_proj(m.down_proj),
            input_norm=self._norms(layer)[0], post_attention_norm=self._norms(layer)[1],
        )


class Phi3Adapter(ArchitectureAdapter):
    """Phi-3: fused ``qkv_proj`` (q rows, then k, then v) and ``gate_up_proj`` (gate, then up)."""

    def __init__(self) -> None:
        from transformers import Phi3ForCausalLM

        type(self).model_classes = (Phi3ForCausalLM,)

    def read_layer(self, layer: nn.Module, shape: AttentionShape) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        q_rows = shape.num_heads * shape.head_dim
        kv_rows = shape.num_kv_heads * shape.head_dim
        inter = m.down_proj.in_features
        return LayerWeights(
            q=_proj(a.qkv_proj, slice(0, q_rows)),
            k=_proj(a.qkv_proj, slice(q_rows, q_rows + kv_rows)),
            v=_proj(a.qkv_proj, slice(q_rows + kv_rows, q_rows + 2 * kv_rows)),
            o=_proj(a.o_proj),
            gate=_proj(m.gate_up_proj, slice(0, inter)),
            up=_proj(m.gate_up_proj, slice(inter, 2 * inter)),
            down=_proj(m.down_proj),
            input_norm=self._norms(layer)[0], post_attention_norm=self._norms(layer)[1],
        )


ADAPTERS: tuple[ArchitectureAdapter, ...] = (LlamaFamilyAdapter(), Phi3Adapter())


def supported_architectures() -> list[str]:
    return sorted(cls.__name__ for a in ADAPTERS for cls in a.model_classes)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter whose model classes include ``model``'s class, or a clear error."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture {type(model).__name__}; supported: {', '.join(supported_architectures())}"
    )


def _static_rope(model: PreTrainedModel) -> tuple[torch.Tensor, float]:
    """inv_freq and cos/sin scaling of the source, refusing RoPE types that change with length."""
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in {"dynamic", "longrope"}:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} changes its frequencies with sequence length; the pruned format "
            "stores static frequencies (default, linear, llama3, yarn are supported)"
        )
    return rotary.inv_freq.detach().clone().float(), float(getattr(rotary, "attention_scaling", 1.0))


def _set(linear: nn.Module, proj: Projection) -> None:
    with torch.no_grad():
        linear.weight.copy_(proj.weight)
        if proj.bias is not None:
            linear.bias.copy_(proj.bias)


def _layer_spec(w: LayerWeights, shape: AttentionShape) -> dict:
    return {
        "attn": {
            "head_to_kv": [h // (shape.num_heads // shape.num_kv_heads) for h in range(shape.num_heads)],
            "num_kv_heads": shape.num_kv_heads,
            "qk_dim": shape.head_dim,
            "rope_pairs": shape.rotary_dim // 2,
            "v_dim": shape.head_dim,
            **{n: linear_spec(getattr(w, n).bias is not None) for n in ("q", "k", "v", "o")},
        },
        "mlp": {
            "intermediate": w.down.weight.shape[1],
            **{n: linear_spec(getattr(w, n).bias is not None) for n in ("gate", "up", "down")},
        },
    }


def pruned_config_for(model: PreTrainedModel, layer_weights: list[LayerWeights] | None = None) -> PrunedConfig:
    """The harness-format config of a dense source model.

    Reads only shapes and bias flags, so it works on a source built on the meta device
    (offloaded pruning reads layers one at a time later, see ``prunebench.harness.offload``).
    ``layer_weights``: the layers already read, so a caller that needs them anyway does not
    read (copy) every layer twice.
    """
    adapter = adapter_for(model)
    config = model.config
    shape = adapter.attention_shape(config)
    _, rope_scaling = _static_rope(model)
    if layer_weights is None:
        layer_weights = [adapter.read_layer(layer, shape) for layer in model.model.layers]
    specs = [_layer_spec(w, shape) for w in layer_weights]
    return PrunedConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=len(specs),
        layers=specs,
        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
        hidden_act=config.hidden_act,
        attn_scale=shape.head_dim**-0.5,
        rope_dim=shape.rotary_dim,
        rope_attention_scaling=rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        source_model_type=config.model_type,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


@torch.no_grad()
def fill_layer(target: nn.Module, source_layer: nn.Module, source: PreTrainedModel) -> None:
    """Copy one dense source decoder layer into a freshly built harness-format layer."""
    adapter = adapter_for(source)
    shape = adapter.attention_shape(source.config)
    _fill_from(target, adapter.read_layer(source_layer, shape), shape)


def _fill_from(target: nn.Module, w: LayerWeights, shape: AttentionShape) -> None:
    attn, mlp = target.self_attn, target.mlp
    for name in ("q", "k", "v", "o"):
        _set(getattr(attn, f"{name}_proj"), getattr(w, name))
    for name in ("gate", "up", "down"):
        _set(getattr(mlp, f"{name}_proj"), getattr(w, name))
    attn.rope_index.copy_(torch.arange(shape.rotary_dim // 2).expand(shape.num_kv_heads, -1))
    target.input_layernorm.weight.copy_(w.input_norm)
    target.post_attention_layernorm.weight.copy_(w.post_attention_norm)


@torch.no_grad()
def fill_outer(target: PrunedForCausalLM, source: PreTrainedModel) -> None:
    """Copy the embeddings, final norm, lm_head and RoPE frequencies (everything but the layers)."""
    target.model.embed_tokens.weight.copy_(source.model.embed_tokens.weight)
    target.model.norm.weight.copy_(source.model.norm.weight)
    if not target.config.tie_word_embeddings:
        target.lm_head.weight.copy_(source.lm_head.weight)
    target.model.inv_freq.copy_(_static_rope(source)[0])


def to_pruned(model: PreTrainedModel) -> PrunedForCausalLM:
    """Convert a dense source model into the harness format (a copy; the source is untouched).

    At sparsity 0 the result computes the same logits as the source (tested per family).
    """
    adapter = adapter_for(model)
    shape = adapter.attention_shape(model.config)
    weights = [adapter.read_layer(layer, shape) for layer in model.model.layers]
    pruned_config = pruned_config_for(model, weights)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    pruned = PrunedForCausalLM(pruned_config).to(dtype=dtype)
    fill_outer(pruned, model)
    with torch.no_grad():
        for layer, w in zip(pruned.model.layers, weights):
            _fill_from(layer, w, shape)
    if pruned_config.tie_word_embeddings:
        pruned.tie_weights()
    return pruned.to(device).eval()
