"""Tests of prunebench.harness.clock: the measuring primitives, not the speed.

Nothing here asserts that one thing is faster than another: this CPU is shared, so only
bookkeeping (calls counted, devices synchronised, bytes added up) is checked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunebench.harness.clock import Timing, time_callable, weight_bytes
from prunebench.harness.errors import UsageError

# --------------------------------------------------------------------------- time_callable


def test_time_callable_counts_and_summary() -> None:
    calls: list[str] = []
    timing = time_callable(lambda: calls.append("x"), warmup=2, repeats=5, device="cpu")
    assert len(calls) == 7
    assert isinstance(timing, Timing) and timing.repeats == 5 and timing.warmup == 2
    assert len(timing.samples_s) == 5
    assert 0 <= timing.min_s <= timing.median_s <= timing.max_s
    assert timing.iqr_s >= 0 and timing.stdev_s >= 0
    assert set(timing.to_dict()) >= {"median_s", "min_s", "iqr_s", "stdev_s", "repeats"}


def test_time_callable_setup_is_fresh_each_call() -> None:
    states: list[list[int]] = []

    def setup() -> list[int]:
        state: list[int] = []
        states.append(state)
        return state

    time_callable(lambda s: s.append(1), warmup=1, repeats=3, device="cpu", setup=setup)
    assert len(states) == 4 and all(s == [1] for s in states)


def test_time_callable_single_repeat_and_bad_counts() -> None:
    timing = time_callable(lambda: None, warmup=0, repeats=1, device="cpu")
    assert timing.iqr_s == 0.0 and timing.stdev_s == 0.0
    with pytest.raises(UsageError):
        time_callable(lambda: None, warmup=0, repeats=0, device="cpu")
    with pytest.raises(UsageError):
        time_callable(lambda: None, warmup=-1, repeats=1, device="cpu")


def test_time_callable_synchronises_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    time_callable(lambda: None, warmup=1, repeats=2, device="cuda")
    # Before and after every call, warm-up included.
    assert len(synced) == 6
    synced.clear()
    time_callable(lambda: None, warmup=1, repeats=2, device="cpu")
    assert synced == []


# --------------------------------------------------------------------------- weight bytes


def test_weight_bytes_is_sum_of_real_tensors() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(torch.float16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    persistent = sum(
        b.numel() * b.element_size()
        for m in model.modules()
        for n, b in m._buffers.items()
        if b is not None and n not in m._non_persistent_buffers_set
    )
    assert weight_bytes(model) == expected + persistent

    module = nn.Linear(4, 3)
    module.register_buffer("kept", torch.zeros(5, dtype=torch.float64))
    module.register_buffer("derived", torch.zeros(100), persistent=False)
    assert weight_bytes(module) == (12 + 3) * 4 + 5 * 8


def test_weight_bytes_refuses_meta_tensors() -> None:
    with torch.device("meta"):
        module = nn.Linear(4, 4)
    with pytest.raises(UsageError, match="meta"):
        weight_bytes(module)
