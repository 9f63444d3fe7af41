"""The measuring primitives of the timing protocol: a clock for one call, and weight bytes.

harness/timing.py builds the protocol (what is timed, on which inputs, how results
compare) on these. They are kept apart because they know nothing about models or layers:
``time_callable`` times any callable, ``weight_bytes`` counts any module's tensors.

Timings use ``time.perf_counter`` and synchronise the device around each timed call
(CUDA kernels run asynchronously, so the clock would otherwise stop early). Medians over
repeats are the headline because a shared machine adds one-sided noise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from prunebench.harness.errors import UsageError

__all__ = ["Timing", "as_device", "check_count", "synchronize", "time_callable", "weight_bytes"]


@dataclass
class Timing:
    """Summary of ``repeats`` timed calls, in seconds.

    ``iqr_s`` (interquartile range) and ``stdev_s`` say how noisy the median is; both
    are 0 for a single repeat. ``samples_s`` keeps every measurement for later analysis.
    """

    median_s: float
    min_s: float
    max_s: float
    mean_s: float
    iqr_s: float
    stdev_s: float
    repeats: int
    warmup: int
    samples_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: the CPU); a `UsageError` for a non-device."""
    try:
        return torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"not a device: {device!r}") from exc


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so the clock measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer >= ``minimum`` (bools refused), else a `UsageError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def time_callable(
    fn: Callable[..., Any],
    warmup: int,
    repeats: int,
    device: str | torch.device | None,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls.

    Without ``setup``, ``fn()`` is timed. With it, each call (warm-up included) first runs
    ``state = setup()`` untimed and then times ``fn(state)``: that is how a decode loop
    gets an identical, fresh KV cache every repeat without paying for the copy.
    """
    warmup = check_count("warmup", warmup, 0)
    repeats = check_count("repeats", repeats, 1)
    dev = as_device(device)

    def once() -> float:
        if setup is not None:
            state = setup()
            synchronize(dev)
            start = time.perf_counter()
            fn(state)
        else:
            synchronize(dev)
            start = time.perf_counter()
            fn()
        synchronize(dev)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    samples = [once() for _ in range(repeats)]
    if repeats > 1:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        iqr, stdev = q3 - q1, statistics.stdev(samples)
    else:
        iqr = stdev = 0.0
    return Timing(
        median_s=statistics.median(samples),
        min_s=min(samples),
        max_s=max(samples),
        mean_s=statistics.fmean(samples),
        iqr_s=iqr,
        stdev_s=stdev,
        repeats=repeats,
        warmup=warmup,
        samples_s=samples,
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, as really allocated.

    Shared tensors (tied embeddings) count once. Non-persistent buffers (rotary tables,
    masks) are excluded: they are derived, not weights. A tensor on the meta device has
    no storage, so the count would be fiction: that raises instead.
    """
    seen: set[int] = set()
    total = 0

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal total
        if id(t) in seen:
            return
        seen.add(id(t))
        if t.is_meta:
            raise UsageError(f"{name} is on the meta device: load real weights before counting bytes")
        total += t.numel() * t.element_size()

    for name, p in model.named_parameters():  # de-duplicates tied parameters
        add(name, p)
    for mod_name, module in model.named_modules():
        skip = getattr(module, "_non_persistent_buffers_set", set())
        for buf_name, buf in module._buffers.items():
            if buf is not None and buf_name not in skip:
                add(f"{mod_name}.{buf_name}" if mod_name else buf_name, buf)
    return total


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
