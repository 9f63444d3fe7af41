"""The one model format every method's output lives in (docs/ARCHITECTURE.md, "The pruned model").

A dense Llama-family or Phi-3 model is converted into this format before pruning (the
adapters do that), so every plugin edits one canonical layer structure, and every
method's result is a real, smaller model that saves and loads with
``save_pretrained`` / ``from_pretrained`` and runs under lm-eval's HF wrapper.

Per decoder layer the config records (``PrunedConfig.layers[i]``):

* attention: ``head_to_kv`` (the KV head each kept query head reads; groups may be
  uneven), ``num_kv_heads``, ``qk_dim`` and ``rope_pairs`` (q/k channels are laid out as
  ``[first halves of kept rotary pairs | second halves | pass-through channels]``; the
  frequency index of each kept pair, per KV head, is the buffer ``rope_index``),
  ``v_dim`` (may differ from ``qk_dim``), and for each projection ``q, k, v, o`` whether it
  has a bias and whether it is a low-rank factor pair (``rank``);
* MLP: ``intermediate``, ``gate/up/down`` specs, an optional parallel low-rank branch
  (``branch_rank``, Olica's linear calibration) and optional residual ``shortcut``
  matrices (SliceGPT).

Why a format of our own rather than masks on the original classes: pruning must make the
model smaller and faster, and methods change things the stock classes cannot express
(per-layer head counts, uneven GQA groups, kept rotary frequencies, v dims that differ
from q/k dims, factor pairs).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from prunebench.harness.errors import UsageError

MODEL_TYPE = "prunebench"

#: The output field the KV cache is returned under: ``cache`` in current transformers 5.x,
#: which warns "`past_key_values` is deprecated" whenever the old name is used (on every
#: forward, if the output were built with it); ``past_key_values`` in early 5.x releases.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def linear_spec(bias: bool = False, rank: int | None = None) -> dict[str, Any]:
    """The config entry of one projection: a dense linear, or a low-rank factor pair."""
    return {"bias": bool(bias), "rank": None if rank is None else int(rank)}


class PrunedConfig(PretrainedConfig):
    """Config of a (possibly) pruned decoder-only model; ``layers`` holds per-layer shapes."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 64,
        norm_dim: int | None = None,
        num_hidden_layers: int = 1,
        layers: list[dict[str, Any]] | None = None,
        rms_norm_eps: float = 1e-6,
        norm_has_weight: bool = True,
        hidden_act: str = "silu",
        attn_scale: float = 0.125,
        rope_dim: int = 0,
        rope_attention_scaling: float = 1.0,
        max_position_embeddings: int = 2048,
        source_model_type: str = "",
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        # RMSNorm divides by the *original* width: after SliceGPT slices the residual
        # stream to d' dims, sum(x^2)/d keeps the scale the weights were trained for.
        self.norm_dim = norm_dim or hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.layers = list(layers or [])
        self.rms_norm_eps = rms_norm_eps
        self.norm_has_weight = norm_has_weight
        self.hidden_act = hidden_act
        self.attn_scale = attn_scale
        self.rope_dim = rope_dim
        self.rope_attention_scaling = rope_attention_scaling
        self.max_position_embeddings = max_position_embeddings
        self.source_model_type = source_model_type
        # lm-eval and generate() look these up.
        self.num_attention_heads = max((len(l["attn"]["head_to_kv"]) for l in self.layers), default=1)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class LowRankLinear(nn.Module):
    """``x -> up(down(x))``: a factor pair (W ~= U V) stored as two linears."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def dense_weight(self) -> torch.Tensor:
        """The product ``U V`` as one matrix (for statistics and tests, not inference)."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def make_linear(in_features: int, out_features: int, spec: dict[str, Any]) -> nn.Module:
    """Build the module a projection spec describes."""
    if spec.get("rank") is not None:
        return LowRankLinear(in_features, out_features, int(spec["rank"]), bool(spec["bias"]))
    return nn.Linear(in_features, out_features, bias=bool(spec["bias"]))


def linear_spec_of(module: nn.Module) -> dict[str, Any]:
    """The spec that rebuilds ``module`` (inverse of :func:`make_linear`)."""
    if isinstance(module, LowRankLinear):
        return linear_spec(module.bias is not None, module.rank)
    return linear_spec(module.bias is not None)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] matrix a projection applies, whatever its form."""
    if isinstance(module, LowRankLinear):
        return module.dense_weight()
    return module.weight


class PrunedRMSNorm(nn.Module):
    """RMSNorm with an optional scale and a fixed divisor (see ``PrunedConfig.norm_dim``)."""

    def __init__(self, dim: int, norm_dim: int, eps: float, has_weight: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if has_weight else None
        self.norm_dim, self.eps = norm_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # float32 at least (as the stock norms), float64 when given: exactness checks need it.
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / self.norm_dim + self.eps)
        h = h.to(dtype)
        return h if self.weight is None else self.weight * h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The Llama convention: channel j rotates with channel j + n/2."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PrunedAttention(nn.Module):
    """Self-attention with per-layer head counts, uneven GQA groups and kept rotary pairs."""

    def __init__(self, config: PrunedConfig, spec: dict[str, Any], layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        head_to_kv = torch.as_tensor(spec["head_to_kv"], dtype=torch.long)
        self.num_heads = int(head_to_kv.numel())
        self.num_kv_heads = int(spec["num_kv_heads"])
        self.qk_dim, self.v_dim = int(spec["qk_dim"]), int(spec["v_dim"])
        self.rope_pairs = int(spec["rope_pairs"])
        self.scale = float(config.attn_scale)
        self.rope_attention_scaling = float(config.rope_attention_scaling)
        self.register_buffer("head_to_kv", head_to_kv, persistent=True)
        self.register_buffer(
            "rope_index", torch.zeros(self.num_kv_heads, self.rope_pairs, dtype=torch.long), persistent=True
        )
        self.q_proj = make_linear(d, self.num_heads * self.qk_dim, spec["q"])
        self.k_proj = make_linear(d, self.num_kv_heads * self.qk_dim, spec["k"])
        self.v_proj = make_linear(d, self.num_kv_heads * self.v_dim, spec["v"])
        self.o_proj = make_linear(self.num_heads * self.v_dim, d, spec["o"])
        self._uniform_groups: bool | None = None

    def uniform_groups(self) -> bool:
        """True when heads map to KV heads as stock GQA does (contiguous, equal groups)."""
        if self._uniform_groups is None:
            h, g = self.num_heads, self.num_kv_heads
            expected = torch.arange(g, device=self.head_to_kv.device).repeat_interleave(h // g) if g and h % g == 0 else None
            self._uniform_groups = expected is not None and torch.equal(expected, self.head_to_kv)
        return self._uniform_groups

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = 2 * self.rope_pairs
        if rot == 0:
            return x
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x_rot = x_rot * cos + rotate_half(x_rot) * sin
        return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot

    def _equal_head_dims(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero-pad q/k or v to one head width when they differ (after the cache, so the
        cache stays narrow). Fused SDPA kernels (CPU flash among them) need equal head dims;
        without this SDPA silently takes its math kernel, 3-4x slower at 512 tokens, and a
        model whose heads were narrowed unevenly (v_dim != qk_dim) is slower than its
        parameter count says. Exact: padded q/k channels add 0 to every score (the scale is
        passed explicitly), padded v channels give output channels that are dropped."""
        if self.qk_dim == self.v_dim:
            return q, k, v
        width = max(self.qk_dim, self.v_dim)
        if self.v_dim < width:
            return q, k, F.pad(v, (0, width - self.v_dim))
        return F.pad(q, (0, width - self.qk_dim)), F.pad(k, (0, width - self.qk_dim)), v

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """``freqs`` is [B, T, rope_dim/2] (position * inv_freq * scaling folded in later)."""
        bsz, seq, _ = x.shape
        if self.num_heads == 0:
            out = x.new_zeros(bsz, seq, self.o_proj.out_features)
            return out + self.o_proj.bias if self.o_proj.bias is not None else out
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.qk_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.qk_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.v_dim).transpose(1, 2)
        if self.rope_pairs:
            # [B, T, G, n] -> [B, G, T, 2n]: each KV group rotates with its kept frequencies.
            f = freqs[:, :, self.rope_index].permute(0, 2, 1, 3)
            f = torch.cat((f, f), dim=-1)
            cos_k = (f.cos() * self.rope_attention_scaling).to(q.dtype)
            sin_k = (f.sin() * self.rope_attention_scaling).to(q.dtype)
            k = self._rope(k, cos_k, sin_k)
            q = self._rope(q, cos_k[:, self.head_to_kv], sin_k[:, self.head_to_kv])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        q, k, v = self._equal_head_dims(q, k, v)
        if self.uniform_groups():
            rep = self.num_heads // self.num_kv_heads
            if rep > 1:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        else:
            k, v = k.index_select(1, self.head_to_kv), v.index_select(1, self.head_to_kv)
        causal = mask is None and seq > 1 and k.shape[2] == seq
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        attn = attn[..., : self.v_dim].transpose(1, 2).reshape(bsz, seq, self.num_heads * self.v_dim)
        return self.o_proj(attn)


class PrunedMLP(nn.Module):
    """Gated MLP with any intermediate size, optional biases and a parallel low-rank branch."""

    def __init__(self, config: PrunedConfig, spec: dict[str, Any]) -> None:
        super().__init__()
        d, inter = config.hidden_size, int(spec["intermediate"])
        self.intermediate = inter
        self.gate_proj = make_linear(d, inter, spec["gate"])
        self.up_proj = make_linear(d, inter, spec["up"])
        self.down_proj = make_linear(inter, d, spec["down"])
        self.act_fn = ACT2FN[config.hidden_act]
        rank = spec.get("branch_rank")
        self.branch = LowRankLinear(d, d, int(rank), bias=False) if rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.intermediate == 0:
            out = x.new_zeros(*x.shape[:-1], self.down_proj.out_features)
            if self.down_proj.bias is not None:
                out = out + self.down_proj.bias
        else:
            out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        if self.branch is not None:
            out = out + self.branch(x)
        return out


class PrunedDecoderLayer(nn.Module):
    """Pre-norm decoder block; the residual path may carry SliceGPT's shortcut matrices."""

    def __init__(self, config: PrunedConfig, spec: dict[str, Any], layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.input_layernorm = PrunedRMSNorm(d, config.norm_dim, config.rms_norm_eps, config.norm_has_weight)
        self.post_attention_layernorm = PrunedRMSNorm(d, config.norm_dim, config.rms_norm_eps, config.norm_has_weight)
        self.self_attn = PrunedAttention(config, spec["attn"], layer_idx)
        self.mlp = PrunedMLP(config, spec["mlp"])
        self.attn_shortcut = nn.Linear(d, d, bias=False) if spec["attn"].get("shortcut") else None
        self.mlp_shortcut = nn.Linear(d, d, bias=False) if spec["mlp"].get("shortcut") else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        residual = hidden_states if self.attn_shortcut is None else self.attn_shortcut(hidden_states)
        h = residual + self.self_attn(self.input_layernorm(hidden_states), freqs, mask, cache)
        residual = h if self.mlp_shortcut is None else self.mlp_shortcut(h)
        return residual + self.mlp(self.post_attention_layernorm(h))


class PrunedModel(nn.Module):
    """Embeddings, decoder layers and final norm; builds rotary angles and masks once."""

    def __init__(self, config: PrunedConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PrunedDecoderLayer(config, s, i) for i, s in enumerate(config.layers))
        self.norm = PrunedRMSNorm(config.hidden_size, config.norm_dim, config.rms_norm_eps, config.norm_has_weight)
        # inv_freq is saved with the weights: it carries any static RoPE scaling the source
        # model applied (linear, llama3, yarn), so the format need not know RoPE types.
        self.register_buffer("inv_freq", torch.zeros(max(config.rope_dim // 2, 0)), persistent=True)

    def rotary_freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Angles [B, T, rope_dim/2] in float32; attention layers pick their kept pairs."""
        return position_ids[..., None].to(torch.float32) * self.inv_freq.to(torch.float32)

    def past_length(self, cache: Cache | None) -> int:
        """Tokens already cached, read from the first layer that still has attention heads."""
        if cache is None:
            return 0
        for layer in self.layers:
            if layer.self_attn.num_heads:
                return cache.get_seq_length(layer.layer_idx)
        return 0

    def forward_layers(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        layers: range | None = None,
    ) -> torch.Tensor:
        freqs = self.rotary_freqs(position_ids)
        mask = build_attention_mask(attention_mask, hidden.shape[1], position_ids, hidden.dtype)
        for i in layers if layers is not None else range(len(self.layers)):
            hidden = self.layers[i](hidden, freqs, mask, cache)
        return hidden


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, position_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """A boolean [B, 1, T, S] mask (True = attend), or None when plain causal masking is exact.

    None covers the common cases (a full prompt without padding, or one decode step with no
    padding), where SDPA's ``is_causal`` or no mask at all is correct and fastest.
    """
    no_padding = attention_mask is None or bool(attention_mask.all())
    if no_padding and (q_len == 1 or attention_mask is None or attention_mask.shape[-1] == q_len):
        return None
    kv_len = attention_mask.shape[-1] if attention_mask is not None else q_len
    key_pos = torch.arange(kv_len, device=position_ids.device)
    query_pos = torch.arange(kv_len - q_len, kv_len, device=position_ids.device)
    mask = key_pos[None, None, None, :] <= query_pos[None, None, :, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
    return mask


class PrunedForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM in the harness format; see the module docstring."""

    config_class = PrunedConfig
    base_model_prefix = "model"
    _no_split_modules = ["PrunedDecoderLayer"]
    _supports_sdpa = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PrunedConfig) -> None:
        super().__init__(config)
        self.model = PrunedModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Weights always come from a source model or a checkpoint; random init only
        # matters for buffers created empty, which conversion or loading fill.
        return

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            start = self.model.past_length(cache)
            position_ids = torch.arange(start, start + hidden.shape[1], device=hidden.device)[None].expand(
                hidden.shape[0], -1
            )
        hidden = self.model.forward_layers(hidden, position_ids, attention_mask, cache)
        hidden = self.model.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})


def register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModelForCausalLM`` load saved pruned models by model_type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, PrunedConfig)
        AutoModelForCausalLM.register(PrunedConfig, PrunedForCausalLM)
    except ValueError:  # already registered in this process
        pass


register_auto_classes()


def head_dim_scale(head_dim: int) -> float:
    """The stock attention scale, kept after pruning: dropping channels must not rescale logits."""
    return 1.0 / math.sqrt(head_dim)


#: Signature of a layer-input builder: ``(hidden_states, position_ids, cache) -> (args, kwargs)``
#: for ``layer(*args, **kwargs)``. It runs outside the timed region (harness/timing.py), so
#: work a full model does once for all layers (rotary tables, masks) is not charged to the
#: one layer. Stock transformers layers get theirs from their adapter (harness/adapters.py).
MakeInputs = Callable[[torch.Tensor, torch.Tensor, Any], tuple[tuple[Any, ...], dict[str, Any]]]


def pruned_layer_inputs(model: nn.Module) -> MakeInputs:
    """A `MakeInputs` for the decoder layers of this format, called alone.

    It follows the layer's own signature: layers taking ``position_ids`` get the harness
    signature ``layer(hidden_states, position_ids, attention_mask=None, <cache>=cache)``
    (the cache under whichever of ``past_key_values`` / ``cache`` they name); layers
    taking ``freqs`` (`PrunedDecoderLayer`) get the rotary angles their model computes
    once per forward (``model.model.rotary_freqs``), untimed like in a real run.
    """
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) == 0:
        raise UsageError(f"{type(model).__name__} has no model.layers")
    params = inspect.signature(layers[0].forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    if "position_ids" in params:
        mask_kw = "attention_mask" if "attention_mask" in params else "mask"

        def by_positions(h: torch.Tensor, pos: torch.Tensor, cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (h, pos), {mask_kw: None, cache_kw: cache}

        return by_positions
    rotary_freqs = getattr(inner, "rotary_freqs", None)
    if "freqs" in params and rotary_freqs is not None:
        mask_kw = "mask" if "mask" in params else "attention_mask"

        def by_freqs(h: torch.Tensor, pos: torch.Tensor, cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (h, rotary_freqs(pos)), {mask_kw: None, cache_kw: cache}

        return by_freqs
    raise UsageError(f"cannot tell how to call {type(layers[0]).__name__}: its forward takes {list(params)}")
