"""Wall-clock timing of dense and pruned models under one procedure.

Why this exists: a pruning method's claim of speedup only means something if the pruned
and the dense model are timed the same way, in the same process, on the same inputs. So
everything here takes its shapes as arguments and records them (``settings``), and
`compare_to_dense` refuses to compare timings taken under different settings.

What is measured (as the paper does):
- prefill latency: one forward over a ``[batch, seqlen]`` prompt, writing a fresh KV cache;
- decode throughput: ``decode_tokens`` greedy single-token steps against a KV cache that
  already holds ``kv_len`` tokens (every repeat starts from an identical copy of it);
- one decoder layer alone: a long-input prefill and one decode step against a
  ``kv_len`` cache, which isolates the part pruning changes from the unchanged
  embeddings and lm_head;
- weight memory: bytes of the real parameter and persistent buffer tensors.

The intra-op thread count (``torch.get_num_threads()``) is recorded and must match too:
on a CPU it changes latencies more than many pruning ratios do.

The clock itself (`time_callable`, device synchronisation, `weight_bytes`) is
harness/clock.py. How a decoder layer is called on its own is known where the layer is
defined: harness/pruned_model.py for the pruned format (`pruned_layer_inputs`), the
architecture adapters in harness/adapters.py for stock transformers models
(`ArchitectureAdapter.layer_inputs`); `layer_inputs_for` asks the right one.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from prunebench.harness.adapters import accepts, adapter_for, cache_kwarg, cache_length, new_cache, to_pruned
from prunebench.harness.clock import Timing, as_device, check_count, time_callable, weight_bytes
from prunebench.harness.errors import UsageError
from prunebench.harness.pruned_model import MakeInputs, pruned_layer_inputs

__all__ = [
    "LATENCY_KEYS",
    "PROTOCOL_KEYS",
    "SIZE_KEYS",
    "MakeInputs",
    "Timing",
    "compare_layers",
    "compare_to_dense",
    "default_layer_inputs",
    "layer_inputs_for",
    "measure_against_dense",
    "time_callable",
    "time_decoder_layer",
    "time_model",
    "weight_bytes",
]

#: Latency keys of `time_model` / `time_decoder_layer` results, and the names their
#: ``pruned / dense`` ratio and ``dense / pruned`` speedup get in `compare_to_dense`.
LATENCY_KEYS: dict[str, tuple[str, str]] = {
    "prefill_s": ("prefill_latency_ratio", "prefill_speedup"),
    "decode_s_per_token": ("decode_latency_ratio", "decode_speedup"),
    "layer_prefill_s": ("layer_prefill_latency_ratio", "layer_prefill_speedup"),
    "layer_decode_s": ("layer_decode_latency_ratio", "layer_decode_speedup"),
}
#: Size keys compared as plain pruned/dense ratios.
SIZE_KEYS: tuple[str, ...] = ("weight_bytes", "layer_weight_bytes")
#: Settings that must match for two timings to be comparable.
PROTOCOL_KEYS: tuple[str, ...] = ("batch", "seqlen", "decode_tokens", "kv_len", "warmup", "repeats", "device", "threads")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Time in eval mode (no dropout), then give the module its mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _model_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to time on; it must be where the model's weights already are."""
    own = _model_device(model)
    if device is None:
        return own if own is not None else torch.device("cpu")
    dev = as_device(device)
    if own is not None and (own.type != dev.type or (dev.index is not None and own.index != dev.index)):
        raise UsageError(f"the model's weights are on {own}, but timing was asked on {dev}: move the model first")
    return dev


# --------------------------------------------------------------------------- whole model


def time_model(
    model: nn.Module,
    batch: int,
    seqlen: int,
    decode_tokens: int,
    kv_len: int,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    last_logits_only: bool = True,
) -> dict[str, Any]:
    """Prefill latency and decode throughput of a causal LM, plus its weight bytes.

    Works for any model called as ``model(input_ids=..., <cache>=..., use_cache=True)``
    (``<cache>`` is ``cache`` or ``past_key_values``, whichever its forward takes).
    Inputs are random token ids from a seeded generator, so the dense and the pruned
    model see the same ones. With ``last_logits_only`` (default) the forward is asked
    for the last position's logits only (``logits_to_keep=1``), as generation does:
    otherwise the full-vocabulary head over every prompt position, which pruning does
    not touch, would dilute the prefill comparison.

    Decode: one untimed forward over ``kv_len`` tokens builds the cache; each repeat then
    takes a deep copy of it and runs ``decode_tokens`` greedy steps, feeding the argmax
    token and the cache back. That the cache really grew by ``decode_tokens`` is checked
    (a model that ignored it would otherwise report a meaningless decode speed).

    Returns a flat dict: ``prefill_s`` (median latency), ``prefill_tokens_per_s``,
    ``decode_s_per_token``, ``decode_tokens_per_s`` (over the batch), ``weight_bytes``,
    the full `Timing` of each phase under ``prefill``/``decode``, and ``settings``.
    """
    batch = check_count("batch", batch, 1)
    seqlen = check_count("seqlen", seqlen, 1)
    decode_tokens = check_count("decode_tokens", decode_tokens, 1)
    kv_len = check_count("kv_len", kv_len, 1)
    dev = _resolve_device(model, device)
    config = getattr(model, "config", None)
    vocab = vocab_size if vocab_size is not None else getattr(config, "vocab_size", None)
    if vocab is None:
        raise UsageError("vocab_size is needed: the model has no config.vocab_size")
    vocab = check_count("vocab_size", vocab, 1)
    max_pos = getattr(config, "max_position_embeddings", None)
    longest = max(seqlen, kv_len + decode_tokens)
    if isinstance(max_pos, int) and longest > max_pos:
        raise UsageError(f"{longest} positions exceed the model's max_position_embeddings ({max_pos})")

    cache_kw = cache_kwarg(model.forward)
    keep = {"logits_to_keep": 1} if last_logits_only and accepts(model.forward, "logits_to_keep") else {}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(dev)
    context = torch.randint(0, vocab, (batch, kv_len), generator=gen).to(dev)

    def forward(ids: torch.Tensor, cache: Any) -> Any:
        return model(input_ids=ids, use_cache=True, **{cache_kw: cache}, **keep)

    def returned_cache(out: Any, fallback: Any) -> Any:
        for name in ("cache", "past_key_values"):
            value = getattr(out, name, None)
            if value is not None:
                return value
        return fallback

    with _eval_mode(model), torch.inference_mode():
        prefill = time_callable(lambda cache: forward(prompt, cache), warmup, repeats, dev, setup=new_cache)

        built = new_cache()
        out = forward(context, built)
        base_cache = returned_cache(out, built)
        first_token = out.logits[:, -1:].argmax(dim=-1)
        if cache_length(base_cache) != kv_len:
            raise UsageError(f"the model did not fill its KV cache: {cache_length(base_cache)} cached tokens, expected {kv_len}")

        def decode(cache: Any) -> Any:
            token = first_token
            for _ in range(decode_tokens):
                step = forward(token, cache)
                cache = returned_cache(step, cache)
                token = step.logits[:, -1:].argmax(dim=-1)
            return cache

        decode_timing = time_callable(decode, warmup, repeats, dev, setup=lambda: copy.deepcopy(base_cache))
        grown = cache_length(decode(copy.deepcopy(base_cache)))
    if grown != kv_len + decode_tokens:
        raise UsageError(f"decoding did not use the KV cache: it holds {grown} tokens, expected {kv_len + decode_tokens}")

    dtype = next((p.dtype for p in model.parameters()), None)
    return {
        "prefill_s": prefill.median_s,
        "prefill_tokens_per_s": batch * seqlen / prefill.median_s,
        "decode_s_per_token": decode_timing.median_s / decode_tokens,
        "decode_tokens_per_s": batch * decode_tokens / decode_timing.median_s,
        "weight_bytes": weight_bytes(model),
        "decode_cache_tokens_after": grown,
        "prefill": prefill.to_dict(),
        "decode": decode_timing.to_dict(),
        "settings": {
            "batch": batch,
            "seqlen": seqlen,
            "decode_tokens": decode_tokens,
            "kv_len": kv_len,
            "warmup": warmup,
            "repeats": repeats,
            "device": str(dev),
            "dtype": str(dtype),
            "threads": torch.get_num_threads(),
            "vocab_size": vocab,
            "seed": seed,
            "last_logits_only": bool(keep),
            "cache_kwarg": cache_kw,
        },
    }


# --------------------------------------------------------------------------- one layer


def default_layer_inputs(hidden_states: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs for the harness decoder-layer signature
    ``layer(hidden_states, position_ids, attention_mask=None, past_key_values=None)``."""
    return (hidden_states, position_ids), {"attention_mask": None, "past_key_values": cache}


def _layer_index(layer: nn.Module, layer_idx: int | None) -> int | None:
    if layer_idx is not None:
        return check_count("layer_idx", layer_idx, 0)
    for owner in (layer, getattr(layer, "self_attn", None), getattr(layer, "attn", None)):
        idx = getattr(owner, "layer_idx", None) if owner is not None else None
        if isinstance(idx, int):
            return idx
    return None


def time_decoder_layer(
    layer: nn.Module,
    hidden_size: int,
    batch: int,
    seqlen: int,
    kv_len: int,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    make_inputs: MakeInputs | None = None,
    layer_idx: int | None = None,
    seed: int = 0,
    expect_cache: bool = True,
) -> dict[str, Any]:
    """Time one decoder layer alone: a ``[batch, seqlen]`` prefill and one decode step.

    The layer is called as ``layer(*args, **kwargs)`` with ``(args, kwargs) =
    make_inputs(hidden_states, position_ids, cache)``; the default builds the harness
    signature ``layer(hidden_states, position_ids, attention_mask=None,
    past_key_values=cache)`` (see `default_layer_inputs`; `layer_inputs_for` gives the
    builder for a model's own layers, stock transformers or pruned). ``make_inputs`` runs
    untimed.

    Prefill writes a fresh ``DynamicCache`` each repeat. Decode: the layer first fills a
    cache with ``kv_len`` positions (untimed, once); each repeat copies it and times one
    token at position ``kv_len``. The layer's attention writes the cache at its own
    ``layer_idx`` (taken from the layer or ``layer.self_attn`` unless given); the cache
    length there is checked, so a layer that ignores the cache fails loudly instead of
    timing a decode without context. Pass ``expect_cache=False`` only for a layer that
    legitimately caches nothing (a pruned layer with no attention heads left). Hidden
    states are seeded random normals in ``dtype`` (default: the layer's parameter dtype).
    """
    hidden_size = check_count("hidden_size", hidden_size, 1)
    batch = check_count("batch", batch, 1)
    seqlen = check_count("seqlen", seqlen, 1)
    kv_len = check_count("kv_len", kv_len, 1)
    dev = _resolve_device(layer, device)
    own_dtype = next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float32)
    dt = dtype if dtype is not None else own_dtype
    build = make_inputs if make_inputs is not None else default_layer_inputs
    idx = _layer_index(layer, layer_idx)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randn(batch, seqlen, hidden_size, generator=gen).to(dev, dt)
    context = torch.randn(batch, kv_len, hidden_size, generator=gen).to(dev, dt)
    step = torch.randn(batch, 1, hidden_size, generator=gen).to(dev, dt)

    def positions(start: int, length: int) -> torch.Tensor:
        return torch.arange(start, start + length, device=dev).unsqueeze(0).expand(batch, -1)

    def call(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        args, kwargs = inputs
        return layer(*args, **kwargs)

    with _eval_mode(layer), torch.inference_mode():
        prefill = time_callable(call, warmup, repeats, dev, setup=lambda: build(prompt, positions(0, seqlen), new_cache()))

        base_cache = new_cache()
        call(build(context, positions(0, kv_len), base_cache))
        held = cache_length(base_cache, idx) if idx is not None else cache_length(base_cache)
        if expect_cache and held != kv_len:
            where = f"at layer_idx {idx}" if idx is not None else "in any layer"
            raise UsageError(
                f"the layer did not write its KV cache {where}: {held} tokens, expected {kv_len} "
                f"(pass layer_idx, or a make_inputs that hands the cache to the layer)"
            )

        def decode_setup() -> tuple[tuple[tuple[Any, ...], dict[str, Any]], Any]:
            cache = copy.deepcopy(base_cache)
            return build(step, positions(kv_len, 1), cache), cache

        decode = time_callable(lambda state: call(state[0]), warmup, repeats, dev, setup=decode_setup)
        inputs, cache = decode_setup()
        call(inputs)
        grown = cache_length(cache, idx) if idx is not None else cache_length(cache)
    if expect_cache and grown != kv_len + 1:
        raise UsageError(f"the decode step did not use the KV cache: it holds {grown} tokens, expected {kv_len + 1}")

    return {
        "layer_prefill_s": prefill.median_s,
        "layer_decode_s": decode.median_s,
        "layer_weight_bytes": weight_bytes(layer),
        "layer_prefill": prefill.to_dict(),
        "layer_decode": decode.to_dict(),
        "settings": {
            "batch": batch,
            "seqlen": seqlen,
            "kv_len": kv_len,
            "hidden_size": hidden_size,
            "warmup": warmup,
            "repeats": repeats,
            "device": str(dev),
            "dtype": str(dt),
            "threads": torch.get_num_threads(),
            "layer_idx": idx,
            "seed": seed,
            "expect_cache": expect_cache,
        },
    }


def layer_inputs_for(model: nn.Module) -> MakeInputs:
    """The input builder for ``model``'s decoder layers, from whoever defines those layers.

    The pruned format (and harness-signature models without ``rotary_emb``) ->
    harness/pruned_model.py's `pruned_layer_inputs`; a stock transformers model -> its
    architecture adapter's `ArchitectureAdapter.layer_inputs`.
    """
    inner = getattr(model, "model", model)
    if hasattr(inner, "rotary_freqs") or not hasattr(inner, "rotary_emb"):
        return pruned_layer_inputs(model)
    return adapter_for(model).layer_inputs(model)


def _attention_heads(layer: nn.Module) -> int | None:
    heads = getattr(getattr(layer, "self_attn", None), "num_heads", None)
    return heads if isinstance(heads, int) else None


def compare_layers(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    batch: int,
    seqlen: int,
    kv_len: int,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device | None = None,
    decode_tokens: int | None = None,
    layers: list[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time decoder layers of the dense and the pruned model one by one, side by side.

    The paper times one decoder layer alone; after non-uniform pruning no single layer is
    representative, so by default every layer index is timed (``layers`` picks a
    subset) and the sums are compared: ``dense`` / ``pruned`` hold the summed
    ``layer_prefill_s``, ``layer_decode_s`` and ``layer_weight_bytes`` of those layers,
    ``ratios`` is `compare_to_dense` of the sums (the decoder stack's speedup without
    embeddings and lm_head), and ``per_layer`` keeps each layer's two timings and ratios.
    The dense and the pruned layer of one index are timed back to back, so slow drifts
    in machine load hit both alike. Pass the dense model in the same format as the
    pruned one (``to_pruned(source)``) so the two run the same layer code.
    ``decode_tokens`` is accepted so one settings dict serves `time_model` too; one layer
    decodes a single step. A pruned layer left with no attention heads caches nothing and
    is timed without expecting a cache.
    """
    dense_layers = getattr(getattr(dense_model, "model", dense_model), "layers", None)
    pruned_layers = getattr(getattr(pruned_model, "model", pruned_model), "layers", None)
    if dense_layers is None or pruned_layers is None:
        raise UsageError("both models need model.layers to time decoder layers")
    if len(dense_layers) != len(pruned_layers):
        raise UsageError(f"the dense model has {len(dense_layers)} layers, the pruned one {len(pruned_layers)}")
    chosen = list(range(len(dense_layers))) if layers is None else list(layers)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(dense_layers)]
    if bad or not chosen:
        raise UsageError(f"layers must be indices in [0, {len(dense_layers)}), got {layers!r}")
    # Each side gets inputs of its own residual width: a transform may have narrowed the
    # residual stream (SliceGPT's sliced hidden size).
    widths = {}
    for side, model in (("dense", dense_model), ("pruned", pruned_model)):
        widths[side] = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(widths[side], int):
            raise UsageError(f"the {side} model has no config.hidden_size")
    make_dense, make_pruned = layer_inputs_for(dense_model), layer_inputs_for(pruned_model)

    per_layer: list[dict[str, Any]] = []
    totals = {side: {"layer_prefill_s": 0.0, "layer_decode_s": 0.0, "layer_weight_bytes": 0} for side in ("dense", "pruned")}
    settings: dict[str, Any] = {}
    for i in chosen:
        row: dict[str, Any] = {"layer": i}
        for side, layer, make in (("dense", dense_layers[i], make_dense), ("pruned", pruned_layers[i], make_pruned)):
            result = time_decoder_layer(
                layer, widths[side], batch, seqlen, kv_len, warmup, repeats, device,
                make_inputs=make, layer_idx=None, seed=seed, expect_cache=_attention_heads(layer) != 0,
            )
            settings = result.pop("settings")
            row[side] = result
            for key in totals[side]:
                totals[side][key] += result[key]
        row["ratios"] = compare_to_dense(row["dense"], row["pruned"])
        per_layer.append(row)
    settings = {k: v for k, v in settings.items() if k not in ("layer_idx", "expect_cache")}
    settings["decode_tokens"] = decode_tokens
    return {
        "layers": chosen,
        "dense": totals["dense"],
        "pruned": totals["pruned"],
        "ratios": compare_to_dense(totals["dense"], totals["pruned"]),
        "per_layer": per_layer,
        "settings": settings,
    }


# --------------------------------------------------------------------------- comparison


def compare_to_dense(dense_timings: dict[str, Any], pruned_timings: dict[str, Any]) -> dict[str, float]:
    """Ratios of a pruned model's timings to the dense model's, for every shared key.

    Directions, fixed so tables never need a footnote:
    - ``<phase>_latency_ratio = pruned / dense`` (``prefill_latency_ratio`` from
      ``prefill_s``, ``decode_latency_ratio`` from ``decode_s_per_token``,
      ``layer_prefill_latency_ratio``, ``layer_decode_latency_ratio``): below 1 means the
      pruned model is faster;
    - ``<phase>_speedup = dense / pruned`` for the same latencies (``prefill_speedup``,
      ``decode_speedup``, ``layer_prefill_speedup``, ``layer_decode_speedup``): above 1
      means faster; decode speedup equals the tokens/s ratio pruned / dense;
    - ``weight_bytes_ratio`` / ``layer_weight_bytes_ratio = pruned / dense``.

    Works on `time_model` and `time_decoder_layer` results (or dicts merging both).
    Timings whose ``settings`` differ in shape, repeats or device are not comparable and
    raise `UsageError`.
    """
    a, b = dense_timings.get("settings"), pruned_timings.get("settings")
    if isinstance(a, dict) and isinstance(b, dict):
        differing = [k for k in PROTOCOL_KEYS if a.get(k) != b.get(k)]
        if differing:
            detail = ", ".join(f"{k}: dense {a.get(k)!r} vs pruned {b.get(k)!r}" for k in differing)
            raise UsageError(f"timings were taken under different settings ({detail})")

    out: dict[str, float] = {}

    def number(d: dict[str, Any], key: str) -> float | None:
        v = d.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    for key, (ratio, speedup) in LATENCY_KEYS.items():
        dense, pruned = number(dense_timings, key), number(pruned_timings, key)
        if dense is None or pruned is None:
            continue
        if dense <= 0 or pruned <= 0:
            raise UsageError(f"{key} must be positive to compare, got dense {dense} and pruned {pruned}")
        out[ratio] = pruned / dense
        out[speedup] = dense / pruned
    for key in SIZE_KEYS:
        dense, pruned = number(dense_timings, key), number(pruned_timings, key)
        if dense is None or pruned is None:
            continue
        if dense <= 0:
            raise UsageError(f"dense {key} must be positive, got {dense}")
        out[f"{key}_ratio"] = pruned / dense
    if not out:
        raise UsageError("no timing keys in common to compare (expected time_model / time_decoder_layer results)")
    return out


def measure_against_dense(
    source_model: nn.Module,
    pruned_model: nn.Module,
    settings: dict[str, int],
    device: torch.device,
    dense: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The protocol's timing block: whole-model prefill/decode of the dense and the pruned
    model, and a few evenly spaced decoder layers side by side, with their ratios.

    ``settings`` is a profile's ``timing`` dict (batch, seqlen, decode_tokens, kv_len,
    warmup, repeats, layers: how many layers to time, 0 = all). ``dense`` reuses an
    earlier `time_model` result of the source model taken under the same settings (a
    speed sweep times the dense model once, not once per pruned model).
    """
    common = dict(batch=settings["batch"], seqlen=settings["seqlen"], decode_tokens=settings["decode_tokens"],
                  kv_len=settings["kv_len"], warmup=settings["warmup"], repeats=settings["repeats"], device=device)
    if dense is None:
        dense = time_model(source_model, vocab_size=source_model.config.vocab_size, **common)
    pruned = time_model(pruned_model, vocab_size=pruned_model.config.vocab_size, **common)
    dense_layer_model = to_pruned(source_model)
    n_layers = len(pruned_model.model.layers)
    # One decoder layer alone (the paper's Appendix F), on evenly spaced layers: a
    # non-uniform allocation makes layers differ, so a few are timed, not just one.
    count = settings.get("layers") or n_layers
    chosen = sorted({round(i * (n_layers - 1) / max(count - 1, 1)) for i in range(min(count, n_layers))})
    layer = compare_layers(dense_layer_model, pruned_model, layers=chosen, **common)
    return {
        "dense": dense, "pruned": pruned, "ratios": compare_to_dense(dense, pruned),
        "layer": layer,
        "weight_bytes": {"dense": weight_bytes(source_model), "pruned": weight_bytes(pruned_model)},
        "settings": dict(settings), "device": str(device),
    }
