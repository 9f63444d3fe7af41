"""Architecture adapters: read a dense transformers model into the harness format.

Each adapter knows how one family stores its projections (Llama's separate q/k/v and
gate/up, Phi-3's fused ``qkv_proj`` and ``gate_up_proj``). Adapters are plugins: they
register through the ``prunebench_adapters`` hook of the entry-point group, the built-in
families in ``harness.builtin_adapters`` exactly like a third-party one. An adapter is
chosen by the model's class (the most specific ``model_classes`` match), never by a
name string, and it is the only place that knows the source layout: after conversion
every plugin edits the same canonical layer.

An adapter also knows how the family's decoder layers are called on their own
(`ArchitectureAdapter.layer_inputs`), which timing one layer needs (harness/timing.py);
the stock transformers call convention, and the helpers for its KV cache and forward
keywords, are the base-class default below.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from prunebench.harness.errors import UnsupportedModelError, UsageError
from prunebench.harness.pruned_model import MakeInputs, PrunedConfig, PrunedForCausalLM, linear_spec


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


def read_projection(linear: nn.Linear, rows: slice | None = None) -> Projection:
    """A copy of one linear map of the source (``rows``: a slice of a fused projection)."""
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    return Projection(w.clone(), None if b is None else b.clone())


class ArchitectureAdapter(ABC):
    """Base adapter: subclasses name their model classes and say how to read a layer."""

    model_classes: ClassVar[tuple[type, ...]] = ()
    name: ClassVar[str] = ""

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes)

    def match_distance(self, model: nn.Module) -> int | None:
        """How far up ``model``'s class hierarchy the nearest of ``model_classes`` is (0: its
        own class), or None when it matches none."""
        mro = type(model).__mro__
        found = [mro.index(cls) for cls in self.model_classes if cls in mro]
        return min(found) if found else None

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

    def layer_inputs(self, model: nn.Module) -> MakeInputs:
        """A `MakeInputs` for ``model``'s decoder layers called alone (one layer's timing).

        The stock transformers convention (Llama, Mistral, Qwen2, Phi-3 alike): the layer
        takes the rotary ``(cos, sin)`` precomputed by the model (``model.model.rotary_emb``)
        and its cache by keyword; the causal mask may be None (SDPA then applies causal
        masking itself for multi-token input). A family whose layers are called otherwise
        overrides this.
        """
        inner = getattr(model, "model", model)
        rotary = getattr(inner, "rotary_emb", None)
        layers = getattr(inner, "layers", None)
        if rotary is None or layers is None or len(layers) == 0:
            raise UsageError(f"{type(model).__name__} has no model.rotary_emb / model.layers: not a stock decoder-only model")
        cache_kw = cache_kwarg(layers[0].forward)

        def make(hidden_states: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            cos_sin = rotary(hidden_states, position_ids=position_ids)
            kwargs = {
                "attention_mask": None,
                "position_ids": position_ids,
                "position_embeddings": cos_sin,
                cache_kw: cache,
                "use_cache": cache is not None,
            }
            return (hidden_states,), kwargs

        return make


def supported_architectures(host: Any = None) -> list[str]:
    """The model classes the registered adapters read (``prunebench_adapters`` plugins)."""
    return sorted({cls.__name__ for a in _adapters(host) for cls in a.model_classes})


def _adapters(host: Any) -> list[ArchitectureAdapter]:
    if host is None:
        from prunebench.harness.manager import default_host

        host = default_host()
    return host.adapters


def adapter_for(model: nn.Module, host: Any = None) -> ArchitectureAdapter:
    """The registered adapter for ``model``'s class: the most specific one (the adapter of
    a subclass wins over its base's), or a clear error naming what is supported.

    ``host`` is the plugin host whose adapters are searched (default: the installed ones).
    """
    best: tuple[int, ArchitectureAdapter] | None = None
    for adapter in _adapters(host):
        distance = adapter.match_distance(model)
        if distance is not None and (best is None or distance < best[0]):
            best = (distance, adapter)
    if best is None:
        raise UnsupportedModelError(
            f"unsupported architecture {type(model).__name__}; supported: {', '.join(supported_architectures(host))} "
            "(an adapter plugin adds one: docs/PLUGINS.md)"
        )
    return best[1]


# --------------------------------------------------------------------------- call convention


def new_cache() -> Any:
    """An empty transformers KV cache, as a model's forward builds one for ``use_cache``."""
    from transformers import DynamicCache

    return DynamicCache()


def cache_length(cache: Any, layer_idx: int | None = None) -> int:
    """Tokens held by a transformers cache: at ``layer_idx``, or the most over all layers.

    The maximum over layers is used by default because in a pruned model the first layer
    may have no attention heads left and so hold nothing.
    """
    if cache is None:
        return 0
    if layer_idx is not None:
        return int(cache.get_seq_length(layer_idx))
    layers = getattr(cache, "layers", None)
    if layers is None:
        return int(cache.get_seq_length())
    return max((int(cache.get_seq_length(i)) for i in range(len(layers))), default=0)


def cache_kwarg(fn: Callable[..., Any]) -> str:
    """The keyword a forward takes its KV cache by.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name is deprecated);
    models written against either name must both work.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    if "cache" in params:
        return "cache"
    return "past_key_values"


def accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name`` (False when it has no signature)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- conversion


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


def pruned_config_for(model: PreTrainedModel, layer_weights: list[LayerWeights] | None = None,
                      host: Any = None) -> PrunedConfig:
    """The harness-format config of a dense source model.

    Reads only shapes and bias flags, so it works on a source built on the meta device
    (offloaded pruning reads layers one at a time later, see ``prunebench.harness.offload``).
    ``layer_weights``: the layers already read, so a caller that needs them anyway does not
    read (copy) every layer twice.
    """
    adapter = adapter_for(model, host)
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


def to_pruned(model: PreTrainedModel, host: Any = None) -> PrunedForCausalLM:
    """Convert a dense source model into the harness format (a copy; the source is untouched).

    At sparsity 0 the result computes the same logits as the source (tested per family).
    """
    adapter = adapter_for(model, host)
    shape = adapter.attention_shape(model.config)
    weights = [adapter.read_layer(layer, shape) for layer in model.model.layers]
    pruned_config = pruned_config_for(model, weights, host)
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
