"""GGUF sources: their content hash, and their one-off conversion into a cached checkpoint.

GGUF sources are dequantized by transformers' GGUF reader, which takes ~30 s for
SmolLM2-135M on a 2-core CPU, so they are converted once into a float32 safetensors
checkpoint in the cache (layout below) and loaded from there afterwards (well under a
second once the libraries are imported; ``load_source_model`` in harness/models.py does
the loading)::

    <cache_root()>/models/
        gguf-sha256.json                    memoised sha256 of GGUF files by (path, size, mtime)
        <stem>-<sha256[:16]>/               one converted checkpoint per GGUF content
            config.json, generation_config.json, model.safetensors, tokenizer files
            prunebench-source.json          written last: marks the conversion complete
        <stem>-<sha256[:16]>.lock           serialises concurrent converters (POSIX)

``<stem>`` is the registered name (``smollm2-135m``) or the GGUF file's own stem. The
conversion is written into a temporary sibling directory and renamed into place, so a
crash never leaves a directory that a later load would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunebench.harness.cache import atomic_write_json, cache_root, default_permissions, read_json
from prunebench.harness.errors import UnsupportedModelError
from prunebench.harness.model_registry import registered_name_for

__all__ = ["convert_gguf", "first_line", "gguf_sha256", "models_cache_dir"]

logger = logging.getLogger(__name__)

_HASH_MEMO = "gguf-sha256.json"
_MARKER = "prunebench-source.json"
_CONVERSION_FORMAT = 1


def models_cache_dir() -> Path:
    """``<cache_root()>/models``: where converted source checkpoints live."""
    return cache_root() / "models"


def first_line(exc: BaseException) -> str:
    """An exception's first line: transformers' and the hub's errors run to many lines,
    and a `UsageError` is printed as one."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
    stem = stem or registered_name_for(gguf) or _safe_stem(gguf.stem)
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
        raise UnsupportedModelError(f"cannot convert GGUF {gguf.name}: {first_line(exc)}") from exc
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
