"""Perplexity over fixed token windows: exp(total NLL / total predicted tokens).

The protocol (docs/PROTOCOL.md) fixes one definition for every method: non-overlapping windows,
each predicting its tokens 2..L from the ones before it, the NLL summed over all windows
before dividing (not a mean of per-window perplexities). A non-finite loss is an error,
never skipped: skipping it would hide exactly the broken models a benchmark must catch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from prunebench.harness.errors import NumericalError
from prunebench.harness.progress import progress_bar

# Log-softmax over a 49k vocabulary makes a float32 copy of the logits; doing it a few
# rows at a time keeps that copy at about this many elements (~64 MB).
LOG_SOFTMAX_CHUNK_ELEMENTS = 16 * 1024 * 1024


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and the totals behind it, so results can be merged or re-derived.

    ``window_nll`` holds the summed NLL of every window, in window order (each window
    predicts the same number of tokens): what a bootstrap over evaluation windows and a
    paired comparison of two models on the same windows need (``harness.verdicts``).
    """

    ppl: float
    nll_sum: float
    tokens: int
    window_nll: tuple[float, ...] = ()


def _model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are; inputs go there unless the caller says otherwise."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _model_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Turn off the KV cache for HF models (useless here, and it costs memory); any other
    model is called with ``input_ids`` only."""
    config = getattr(model, "config", None)
    return {"use_cache": False} if config is not None and hasattr(config, "use_cache") else {}


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64 scalar) of tokens 2..L given logits [b, L, V] for input_ids [b, L]."""
    return window_nll(logits, input_ids).sum()


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 2..L of each sequence, float64 [b].

    The log-softmax runs in float32 (float64 for a float64 model) over chunks of positions
    so that no full copy of the logits is made; each chunk's sums are accumulated in float64.
    """
    batch, length, vocab = logits.shape
    predicted = logits[:, :-1, :]
    targets = input_ids[:, 1:].to(logits.device)
    step = max(1, LOG_SOFTMAX_CHUNK_ELEMENTS // max(1, batch * vocab))
    compute = torch.promote_types(logits.dtype, torch.float32)
    total = torch.zeros(batch, dtype=torch.float64, device=logits.device)
    for start in range(0, length - 1, step):
        chunk = predicted[:, start : start + step, :].to(compute)
        target = targets[:, start : start + step]
        log_norm = torch.logsumexp(chunk, dim=-1)
        target_logit = chunk.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        total += (log_norm - target_logit).double().sum(-1)
    return total


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_windows(windows: torch.Tensor, batch_size: int) -> None:
    """Refuse inputs that would give a meaningless number rather than an error later."""
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [k >= 1, seqlen >= 2] token ids, got shape {tuple(windows.shape)}")
    if windows.dtype != torch.long:
        raise ValueError(f"windows must be torch.long token ids, got {windows.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` [k, L] (e.g. from ``evaluation_windows``).

    Works with any module whose ``model(input_ids=...)`` returns an object with
    ``.logits`` [b, L, V]. Raises ``NumericalError`` on the first batch whose loss is not
    finite, naming the windows.
    """
    _check_windows(windows, batch_size)
    target_device = torch.device(device) if device is not None else _model_device(model)
    kwargs = _model_kwargs(model)
    per_window: list[float] = []
    count, seqlen = windows.shape
    with _eval_mode(model), torch.inference_mode(), progress_bar("perplexity (windows)", count, enabled=progress) as advance:
        for start in range(0, count, batch_size):
            batch = windows[start : start + batch_size].to(target_device)
            logits = model(input_ids=batch, **kwargs).logits
            if logits.shape[:2] != batch.shape:
                shape, given = tuple(logits.shape), tuple(batch.shape)
                raise ValueError(f"model returned logits of shape {shape} for input {given}")
            nll = window_nll(logits, batch).cpu()
            if not torch.isfinite(nll).all():
                end = start + batch.shape[0] - 1
                raise NumericalError(f"non-finite loss ({nll.sum().item()}) in evaluation windows {start}..{end}")
            per_window.extend(nll.tolist())
            advance(batch.shape[0])
    return result_from_windows(per_window, seqlen - 1)


def result_from_windows(per_window: list[float], tokens_per_window: int) -> PerplexityResult:
    """The result of windows with these summed NLLs, each predicting ``tokens_per_window``."""
    total = math.fsum(per_window)
    return result_from_nll(total, len(per_window) * tokens_per_window, tuple(per_window))


def result_from_nll(nll_sum: float, tokens: int, window_nll: tuple[float, ...] = ()) -> PerplexityResult:
    """exp(summed NLL / predicted tokens), inf instead of an overflow."""
    mean = nll_sum / tokens
    ppl = math.exp(mean) if mean < math.log(torch.finfo(torch.float64).max) else math.inf
    return PerplexityResult(ppl=ppl, nll_sum=nll_sum, tokens=tokens, window_nll=window_nll)
