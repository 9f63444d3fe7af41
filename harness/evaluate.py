"""Evaluate a saved checkpoint that may not fit on one device: accelerate device maps.

``load_dispatched`` loads a checkpoint directory (a pruned model from ``prunebench run
--save`` or ``prunebench offload``, or a dense transformers model) with
``device_map`` and ``max_memory``: accelerate places whole decoder layers on the GPUs,
then CPU memory, then an offload folder on disk, and moves each layer's weights to the
execution device only while it runs. Perplexity and lm-eval then run on it unchanged
(lm-eval's HF wrapper accepts a dispatched model). ``PrunedForCausalLM`` declares
``PrunedDecoderLayer`` as the unit that must not be split.

Data-parallel evaluation on several devices is lm-eval's own: launch it with
``accelerate launch -m lm_eval --model hf --model_args pretrained=DIR ...`` on the saved
checkpoint; the harness adds nothing to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from prunebench.harness.errors import UsageError


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``"0=70GiB,cpu=20GiB"`` -> ``{0: "70GiB", "cpu": "20GiB"}`` (accelerate's form)."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise UsageError(f"--max-memory expects DEVICE=SIZE pairs like 0=70GiB,cpu=20GiB; got {part!r}")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def load_dispatched(
    directory: str | os.PathLike[str],
    device_map: str | dict[str, Any] = "auto",
    max_memory: dict[int | str, str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A checkpoint loaded across devices (and disk); see the module docstring."""
    from transformers import AutoModelForCausalLM

    import prunebench.harness.pruned_model  # noqa: F401  (registers the pruned format with the Auto classes)

    if not Path(directory).is_dir():
        raise UsageError(f"not a checkpoint directory: {directory}")
    kwargs: dict[str, Any] = {"device_map": device_map, "dtype": dtype}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).eval()


def execution_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the embeddings (accelerate moves the rest)."""
    placement = getattr(model, "hf_device_map", None) or {}
    for name, device in placement.items():
        if "embed" in name or name == "":
            return torch.device("cpu" if device in ("cpu", "disk") else device)
    return next(model.parameters()).device if not next(model.parameters()).is_meta else torch.device("cpu")
