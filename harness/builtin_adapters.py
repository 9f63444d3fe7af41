"""The built-in architecture adapters: the Llama family and Phi-3.

Registered through the ``prunebench`` entry-point group (``core-adapters``) like any
third-party adapter; ``harness.adapters`` has the base class and the conversion.
"""

from __future__ import annotations

from torch import nn

from prunebench.harness.adapters import ArchitectureAdapter, AttentionShape, LayerWeights, read_projection
from prunebench.harness.hookspecs import hookimpl


class LlamaFamilyAdapter(ArchitectureAdapter):
    """Llama, SmolLM, Mistral, Qwen2 (q/k/v biases): separate projections."""

    name = "llama-family"

    def __init__(self) -> None:
        from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

        type(self).model_classes = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)

    def read_layer(self, layer: nn.Module, shape: AttentionShape) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        return LayerWeights(
            q=read_projection(a.q_proj), k=read_projection(a.k_proj), v=read_projection(a.v_proj), o=read_projection(a.o_proj),
            gate=read_projection(m.gate_proj), up=read_projection(m.up_proj), down=read_projection(m.down_proj),
            input_norm=self._norms(layer)[0], post_attention_norm=self._norms(layer)[1],
        )


class Phi3Adapter(ArchitectureAdapter):
    """Phi-3: fused ``qkv_proj`` (q rows, then k, then v) and ``gate_up_proj`` (gate, then up)."""

    name = "phi3"

    def __init__(self) -> None:
        from transformers import Phi3ForCausalLM

        type(self).model_classes = (Phi3ForCausalLM,)

    def read_layer(self, layer: nn.Module, shape: AttentionShape) -> LayerWeights:
        a, m = layer.self_attn, layer.mlp
        q_rows = shape.num_heads * shape.head_dim
        kv_rows = shape.num_kv_heads * shape.head_dim
        inter = m.down_proj.in_features
        return LayerWeights(
            q=read_projection(a.qkv_proj, slice(0, q_rows)),
            k=read_projection(a.qkv_proj, slice(q_rows, q_rows + kv_rows)),
            v=read_projection(a.qkv_proj, slice(q_rows + kv_rows, q_rows + 2 * kv_rows)),
            o=read_projection(a.o_proj),
            gate=read_projection(m.gate_up_proj, slice(0, inter)),
            up=read_projection(m.gate_up_proj, slice(inter, 2 * inter)),
            down=read_projection(m.down_proj),
            input_norm=self._norms(layer)[0], post_attention_norm=self._norms(layer)[1],
        )



@hookimpl
def prunebench_adapters() -> list[ArchitectureAdapter]:
    return [LlamaFamilyAdapter(), Phi3Adapter()]
