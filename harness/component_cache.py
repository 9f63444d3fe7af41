"""Caching a component's expensive, method-independent result (e.g. mask gradients).

A component's statistics can cost minutes (a backward pass over the calibration data),
and a grid of methods and sparsities asks for the same ones again and again. The key of
an entry covers everything that determines it: the run's ``cache_parts`` (model
fingerprint, data spec, seed, sequence length), the component and every parameter that
changes the result, the batch size, a digest of the calibration token ids, and a cheap
fingerprint of the current weights (a transform before the importance stage must not
hit the dense model's entry). Entries are written atomically (``harness.cache``).
A public contract module: any method may use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from prunebench.harness.cache import stable_key, torch_cache_get, torch_cache_put

if TYPE_CHECKING:
    from prunebench.harness.context import RunContext

T = TypeVar("T")


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of token ids (cheap: a few hundred KB)."""
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def weight_fingerprint(model: nn.Module) -> str:
    """A cheap digest of the current weights: per tensor its name, shape, and float64 sum
    and absolute sum rounded to 10 significant digits (rounding keeps the digest stable
    across thread counts)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = float(torch.sum(p, dtype=torch.float64))
            a = float(torch.sum(p.abs(), dtype=torch.float64))
            h.update(f"{name}:{tuple(p.shape)}:{s:.10g}:{a:.10g};".encode())
    return h.hexdigest()


def run_cache_key(run: RunContext, kind: str, version: int, component: str, params: dict[str, Any],
                  ignore: Iterable[str] = ()) -> str | None:
    """The key of ``component``'s result for this run, or None when caching is off.

    Off when ``run.use_cache`` is False or ``run.cache_parts`` is empty (then nothing
    identifies the data spec and seed, and a shared entry could be stale). ``ignore``
    names parameters that trade memory for time without changing the result.
    """
    if not run.use_cache or not run.cache_parts:
        return None
    result_params = {k: v for k, v in params.items() if k not in set(ignore)}
    return stable_key(
        kind, version, component, dict(run.cache_parts), result_params,
        {"batch_size": int(run.batch_size), "calibration": ids_digest(run.calibration),
         "weights": weight_fingerprint(run.model)},
    )


def cached(kind: str, key: str | None, compute: Callable[[], T], encode: Callable[[T], Any],
           decode: Callable[[Any], T]) -> tuple[T, str]:
    """The cached value under ``key`` (decoded), else ``compute()`` stored under it.
    Returns the value and "hit", "miss" or "off" (no key: caching off)."""
    if key is not None:
        hit = torch_cache_get(kind, key)
        if hit is not None:
            return decode(hit), "hit"
    value = compute()
    if key is not None:
        torch_cache_put(kind, key, encode(value))
    return value, "off" if key is None else "miss"
