"""Tests of prunebench.harness.timing: the procedure, not the speed (the clock itself: tests/test_clock.py).

Nothing here asserts that one thing is faster than another: this CPU is shared, so only
self-consistency (a model timed against itself) and bookkeeping (the cache really grows,
bytes add up, ratios point the right way) are checked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from prunebench.harness.adapters import adapter_for, cache_length
from prunebench.harness.clock import weight_bytes
from prunebench.harness.errors import UsageError
from prunebench.harness.pruned_model import pruned_layer_inputs
from prunebench.harness.timing import (
    compare_layers,
    compare_to_dense,
    layer_inputs_for,
    time_decoder_layer,
    time_model,
)

HIDDEN = 64


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on an oversubscribed 2-core machine, OpenMP spinning across
    two threads makes tiny-model timings far noisier than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- stand-in layer


class _Attention(nn.Module):
    """Causal attention that keeps K/V in a transformers cache under its ``layer_idx``."""

    def __init__(self, d: int, heads: int, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        # A position-dependent phase so position_ids matter (a stand-in for RoPE).
        phase = torch.cos(position_ids.to(x.dtype))[:, None, :, None]
        q, k = q * phase, k * phase
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        causal = t > 1 and k.shape[2] == t
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class StandInLayer(nn.Module):
    """A decoder layer with the harness signature the pruned format uses:
    ``layer(hidden_states, position_ids, attention_mask=None, past_key_values=None)``."""

    def __init__(self, d: int = HIDDEN, heads: int = 4, layer_idx: int = 3, use_cache: bool = True) -> None:
        super().__init__()
        self.self_attn = _Attention(d, heads, layer_idx)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)
        self.use_cache = use_cache
        self.seen_kv_lengths: list[int] = []

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
    ) -> torch.Tensor:
        assert attention_mask is None
        cache = past_key_values if self.use_cache else None
        h = hidden_states + self.self_attn(self.norm(hidden_states), position_ids, cache)
        if cache is not None:
            self.seen_kv_lengths.append(cache.get_seq_length(self.self_attn.layer_idx))
        return h + self.mlp(h)


# --------------------------------------------------------------------------- whole model


def test_model_against_itself_is_within_noise(llama: LlamaForCausalLM, one_thread: None) -> None:
    """Timing a model against itself must give ratios near 1.

    The bounds are wide for a shared CPU; other developers' jobs can stall one window,
    so up to five attempts are made and one must fall inside. A systematic error (e.g.
    the two calls timing different work) fails all of them.
    """
    kwargs = {"batch": 2, "seqlen": 48, "decode_tokens": 6, "kv_len": 48, "warmup": 2, "repeats": 41}
    attempts: list[dict[str, float]] = []
    for _ in range(5):
        dense = time_model(llama, **kwargs)
        again = time_model(llama, **kwargs)
        ratios = compare_to_dense(dense, again)
        attempts.append(ratios)
        if all(0.6 <= ratios[k] <= 1.6 for k in ("prefill_latency_ratio", "prefill_speedup", "decode_latency_ratio", "decode_speedup")):
            break
    else:
        pytest.fail(f"self-comparison ratios outside [0.6, 1.6] in every attempt: {attempts}")
    assert ratios["weight_bytes_ratio"] == 1.0


def test_time_model_result_and_cache_growth(llama: LlamaForCausalLM) -> None:
    result = time_model(llama, batch=1, seqlen=16, decode_tokens=4, kv_len=20, warmup=0, repeats=2, device="cpu")
    assert result["decode_cache_tokens_after"] == 20 + 4
    assert result["prefill_s"] > 0 and result["decode_s_per_token"] > 0
    assert result["decode_tokens_per_s"] == pytest.approx(4 / result["decode"]["median_s"])
    assert result["prefill_tokens_per_s"] == pytest.approx(16 / result["prefill_s"])
    assert result["weight_bytes"] == weight_bytes(llama)
    settings = result["settings"]
    assert settings["kv_len"] == 20 and settings["decode_tokens"] == 4 and settings["vocab_size"] == 256
    assert settings["last_logits_only"] is True and settings["threads"] == torch.get_num_threads()
    assert llama.training is False


def test_time_model_decode_feeds_the_cache_back(llama: LlamaForCausalLM) -> None:
    """Every decode step is one new token whose cache already holds all earlier ones."""
    seen: list[tuple[int, int]] = []
    original = llama.forward

    @functools.wraps(original)  # keeps the signature, so time_model passes `cache=`
    def spy(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((kwargs["input_ids"].shape[1], cache_length(cache)))
        return original(*args, **kwargs)

    llama.forward = spy  # instance attribute: the module's __call__ dispatches to it
    try:
        time_model(llama, batch=1, seqlen=8, decode_tokens=3, kv_len=10, warmup=0, repeats=1)
    finally:
        del llama.forward
    decode_steps = [s for s in seen if s[0] == 1]
    # one timed repeat plus the final growth check, 3 steps each
    assert decode_steps == [(1, 10), (1, 11), (1, 12)] * 2


class _NoCacheLM(nn.Module):
    """A causal LM that ignores the KV cache: decode timings of it would be meaningless."""

    def __init__(self, vocab: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.emb(input_ids)), past_key_values=None)


def test_time_model_refuses_a_model_that_ignores_the_cache() -> None:
    with pytest.raises(UsageError, match="KV cache"):
        time_model(_NoCacheLM(), batch=1, seqlen=4, decode_tokens=2, kv_len=4, warmup=0, repeats=1, vocab_size=32)


def test_time_model_bad_arguments(llama: LlamaForCausalLM) -> None:
    with pytest.raises(UsageError):
        time_model(llama, batch=0, seqlen=8, decode_tokens=1, kv_len=4, warmup=0, repeats=1)
    with pytest.raises(UsageError, match="max_position_embeddings"):
        time_model(llama, batch=1, seqlen=8, decode_tokens=8, kv_len=255, warmup=0, repeats=1)
    with pytest.raises(UsageError, match="move the model"):
        time_model(llama, batch=1, seqlen=8, decode_tokens=1, kv_len=4, warmup=0, repeats=1, device="cuda")


# --------------------------------------------------------------------------- one layer


def test_time_decoder_layer_with_harness_signature() -> None:
    torch.manual_seed(0)
    layer = StandInLayer(layer_idx=3)
    result = time_decoder_layer(layer, HIDDEN, batch=2, seqlen=32, kv_len=40, warmup=1, repeats=3, device="cpu", dtype=torch.float32)
    assert result["layer_prefill_s"] > 0 and result["layer_decode_s"] > 0
    assert result["settings"]["layer_idx"] == 3  # found on layer.self_attn
    assert result["layer_weight_bytes"] == weight_bytes(layer)
    # Prefill: a fresh cache each call ends at 32. Decode: each step sees 40 + 1.
    assert set(layer.seen_kv_lengths) == {32, 40, 41}
    assert layer.seen_kv_lengths.count(40) == 1  # the cache is built once, then copied


def test_time_decoder_layer_explicit_layer_idx_must_match_the_cache() -> None:
    layer = StandInLayer(layer_idx=3)
    with pytest.raises(UsageError, match="layer_idx 0"):
        time_decoder_layer(layer, HIDDEN, 1, 8, 8, 0, 1, "cpu", torch.float32, layer_idx=0)


def test_time_decoder_layer_refuses_a_layer_that_ignores_the_cache() -> None:
    with pytest.raises(UsageError, match="KV cache"):
        time_decoder_layer(StandInLayer(use_cache=False), HIDDEN, 1, 8, 8, 0, 1, "cpu", torch.float32)


def test_time_decoder_layer_on_stock_llama_layer(llama: LlamaForCausalLM) -> None:
    layer = llama.model.layers[1]
    result = time_decoder_layer(
        layer, HIDDEN, batch=1, seqlen=16, kv_len=24, warmup=0, repeats=2, device="cpu",
        dtype=torch.float32, make_inputs=adapter_for(llama).layer_inputs(llama),
    )
    assert result["settings"]["layer_idx"] == 1 and result["layer_decode_s"] > 0


def test_compare_layers_on_the_pruned_format(llama: LlamaForCausalLM) -> None:
    """Dense (converted to the harness format) against itself, layer by layer."""
    adapters = pytest.importorskip("prunebench.harness.adapters")
    dense = adapters.to_pruned(llama).eval()
    result = compare_layers(dense, dense, batch=1, seqlen=16, kv_len=16, warmup=0, repeats=1, decode_tokens=4)
    assert result["layers"] == [0, 1] and len(result["per_layer"]) == 2
    assert result["settings"]["decode_tokens"] == 4 and "layer_idx" not in result["settings"]
    assert result["ratios"]["layer_weight_bytes_ratio"] == 1.0
    assert result["dense"]["layer_weight_bytes"] == sum(weight_bytes(layer) for layer in dense.model.layers)
    assert {"layer_prefill_speedup", "layer_decode_speedup"} <= set(result["ratios"])
    # A stock model against its converted copy: each side gets its own input builder.
    mixed = compare_layers(llama, dense, batch=1, seqlen=8, kv_len=8, warmup=0, repeats=1, layers=[1])
    assert mixed["layers"] == [1] and mixed["per_layer"][0]["layer"] == 1
    with pytest.raises(UsageError, match="layers"):
        compare_layers(llama, dense, batch=1, seqlen=8, kv_len=8, warmup=0, repeats=1, layers=[2])


def test_layer_inputs_follow_the_layer_signature(llama: LlamaForCausalLM) -> None:
    pos = torch.arange(4)[None]
    h = torch.zeros(1, 4, HIDDEN)
    args, kwargs = layer_inputs_for(llama)(h, pos, None)
    assert args == (h,) and "position_embeddings" in kwargs  # stock transformers layer

    class Harness(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([StandInLayer()])

    args, kwargs = pruned_layer_inputs(Harness())(h, pos, "C")
    assert args == (h, pos) and kwargs == {"attention_mask": None, "past_key_values": "C"}


# --------------------------------------------------------------------------- bytes and ratios


def test_compare_to_dense_directions() -> None:
    settings = {"batch": 1, "seqlen": 8, "decode_tokens": 2, "kv_len": 8, "warmup": 0, "repeats": 1, "device": "cpu", "threads": 1}
    dense = {"prefill_s": 2.0, "decode_s_per_token": 0.5, "weight_bytes": 1000, "settings": settings}
    pruned = {"prefill_s": 1.0, "decode_s_per_token": 0.25, "weight_bytes": 600, "settings": dict(settings)}
    ratios = compare_to_dense(dense, pruned)
    assert ratios == pytest.approx(
        {"prefill_latency_ratio": 0.5, "prefill_speedup": 2.0, "decode_latency_ratio": 0.5, "decode_speedup": 2.0, "weight_bytes_ratio": 0.6}
    )
    layer = compare_to_dense({"layer_prefill_s": 1.0, "layer_decode_s": 1.0}, {"layer_prefill_s": 0.8, "layer_decode_s": 1.25})
    assert layer == pytest.approx(
        {"layer_prefill_latency_ratio": 0.8, "layer_prefill_speedup": 1.25, "layer_decode_latency_ratio": 1.25, "layer_decode_speedup": 0.8}
    )


def test_compare_to_dense_refuses_different_settings() -> None:
    a = {"prefill_s": 1.0, "settings": {"batch": 1, "seqlen": 8}}
    b = {"prefill_s": 1.0, "settings": {"batch": 1, "seqlen": 16}}
    with pytest.raises(UsageError, match="seqlen"):
        compare_to_dense(a, b)
    with pytest.raises(UsageError):
        compare_to_dense({"other": 1}, {"other": 2})


def test_cache_length_reads_any_layer() -> None:
    cache = DynamicCache()
    kv = torch.zeros(1, 1, 5, 4)
    cache.update(kv, kv, 2)  # layers 0 and 1 stay empty, as in a pruned model
    assert cache_length(cache) == 5 and cache_length(cache, 2) == 5 and cache_length(cache, 0) == 0
    assert cache_length(None) == 0


def test_compare_layers_feeds_each_side_its_own_residual_width(llama: LlamaForCausalLM) -> None:
    """SliceGPT narrows the residual stream: its layers take the sliced width, not the dense one."""
    from prunebench.harness.adapters import to_pruned
    from prunebench.harness.context import RunContext
    from prunebench.harness.manager import PluginHost
    from prunebench.harness.runner import prune

    dense = to_pruned(llama).eval()
    host = PluginHost()
    ids = torch.randint(0, llama.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    run = RunContext(model=to_pruned(llama).eval(), calibration=ids, batch_size=4, device=torch.device("cpu"),
                     seed=0, target=0.3)
    prune(run, host.resolve("slicegpt"), host, show_progress=False)
    assert run.model.config.hidden_size < dense.config.hidden_size
    result = compare_layers(dense, run.model, batch=1, seqlen=8, kv_len=8, warmup=0, repeats=1, layers=[0])
    assert result["ratios"]["layer_weight_bytes_ratio"] < 1.0


def test_measure_against_dense_reuses_a_dense_timing(llama: LlamaForCausalLM) -> None:
    """The protocol's timing block; a speed sweep passes the dense timing once for many
    pruned models, and it is then taken as given, not re-measured."""
    from prunebench.harness.adapters import to_pruned
    from prunebench.harness.timing import measure_against_dense

    settings = {"batch": 1, "seqlen": 8, "decode_tokens": 2, "kv_len": 8, "warmup": 0, "repeats": 1, "layers": 1}
    pruned = to_pruned(llama).eval()
    first = measure_against_dense(llama, pruned, settings, torch.device("cpu"))
    assert first["layer"]["layers"] == [0]
    assert first["weight_bytes"]["dense"] == weight_bytes(llama)
    again = measure_against_dense(llama, pruned, settings, torch.device("cpu"), dense=first["dense"])
    assert again["dense"] is first["dense"]
    assert again["ratios"]["prefill_latency_ratio"] == pytest.approx(
        again["pruned"]["prefill_s"] / first["dense"]["prefill_s"])
