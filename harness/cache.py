"""A small on-disk cache for expensive, reusable results.

Why it exists: on a 2-core CPU a dense evaluation or a pass of calibration statistics
costs minutes, and a grid of runs asks for the same ones again and again. Two rules keep
the cache honest (docs/ARCHITECTURE.md, "Caches"; a cache keyed by a model name alone goes stale):

* a key is the hash of *every* input that affects the result (`stable_key`), so a
  changed model fingerprint, sequence length or seed is a miss, never a stale hit;
* every write is atomic (`atomic_write_bytes` and friends write a temporary file in the
  same directory and ``os.replace`` it into place), so a crash or a concurrent writer
  never leaves a half-written entry that a later run would trust.

Layout::

    <cache_root()>/                     PRUNEBENCH_CACHE, default ~/.cache/prunebench
        models/                         converted source models (see prunebench.harness.gguf)
        <kind>/<key>.pt                 torch_cache_put(kind, key, obj)
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

import torch

__all__ = [
    "CACHE_ENV",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "cache_root",
    "default_permissions",
    "read_json",
    "stable_key",
    "torch_cache_get",
    "torch_cache_path",
    "torch_cache_put",
]

CACHE_ENV = "PRUNEBENCH_CACHE"
"""Environment variable naming the cache root; read on every call so tests can redirect it."""

_DEFAULT_ROOT = "~/.cache/prunebench"

# A kind or key becomes one path component: it must not be able to climb out of the root
# or hide as a dot-file (temporary files start with a dot).
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,199}$")


# Read once: os.umask can only be read by setting it, which is not thread-safe later on.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_permissions(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give, i.e. 0o666/0o777 minus the umask.

    ``tempfile`` creates private (0o600/0o700) files and directories; once renamed into
    place they are cache entries that other users of a shared cache must be able to
    read, so writers reset them to what an ordinary write would have produced.
    """
    return (0o777 if directory else 0o666) & ~_UMASK


def cache_root() -> Path:
    """The directory every harness cache lives under.

    ``$PRUNEBENCH_CACHE`` when set (``~`` expanded), else ``~/.cache/prunebench``. It is
    not created here: only writers create directories, so a read-only lookup never
    leaves empty folders behind.
    """
    raw = os.environ.get(CACHE_ENV) or _DEFAULT_ROOT
    return Path(raw).expanduser()


def _canonical(obj: Any) -> Any:
    """Turn the JSON-unfriendly values that commonly appear in keys into plain JSON.

    Anything else raises ``TypeError``: falling back to ``repr`` would put memory
    addresses or unordered set reprs into keys and make them silently unstable.
    """
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__qualname__, **dataclasses.asdict(obj)}
    if isinstance(obj, (set, frozenset)):
        # Order by each element's own canonical encoding; json encodes the elements.
        return sorted(obj, key=lambda v: json.dumps(v, sort_keys=True, default=_canonical))
    if isinstance(obj, bytes):
        return {"__bytes__": obj.hex()}
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(
        f"stable_key cannot canonicalise {type(obj).__name__!r}; pass plain data "
        "(str, int, float, bool, None, list, dict, Path, dataclass, enum)"
    )


def stable_key(*parts: Any) -> str:
    """A sha256 hex digest of a canonical JSON encoding of ``parts``.

    Put every input that affects the cached result into ``parts`` (model fingerprint,
    data spec, sequence length, seed, code version of the producer...). The encoding
    sorts dict keys and uses fixed separators, so the same parts give the same key in
    every process and on every machine; the part order matters. Tuples encode like
    lists.
    """
    text = json.dumps(
        list(parts),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=True,
        default=_canonical,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    Use it when a writer wants a file name rather than bytes (``torch.save``,
    ``safetensors``). The temporary file lives in the destination directory so that
    ``os.replace`` is a same-filesystem rename, atomic on POSIX and Windows: readers see
    either the old file or the complete new one. On any exception the temporary file is
    removed and nothing at ``path`` changes.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, default_permissions())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_file(path: Path) -> None:
    """Flush a file's data to disk before it is renamed into place.

    Without it a power loss after the rename can leave a complete-looking name with
    empty contents on some filesystems.
    """
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically.

    Sorted keys keep the files diff-friendly (results are committed) and byte-stable.
    """
    text = json.dumps(obj, indent=2, sort_keys=True, default=_canonical) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _check_component(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_COMPONENT.match(value) or ".." in value:
        raise ValueError(
            f"cache {what} {value!r} must be a plain name of letters, digits and '_.=+-' "
            "(it becomes one path component under the cache root)"
        )
    return value


def torch_cache_path(kind: str, key: str) -> Path:
    """Where ``torch_cache_put(kind, key, ...)`` stores its object: ``<root>/<kind>/<key>.pt``."""
    return cache_root() / _check_component(kind, "kind") / f"{_check_component(key, 'key')}.pt"


def torch_cache_get(kind: str, key: str, *, weights_only: bool = True) -> Any | None:
    """Load a cached object, or return ``None`` on a miss.

    Objects are loaded onto the CPU (a result cached on a GPU machine must load on a
    CPU-only one; callers move tensors where they need them). ``weights_only=True``
    (tensors, numbers, strings, lists, dicts) is the safe default; pass ``False`` only
    for objects this harness wrote itself. A file that exists but cannot be read is an
    error, not a miss: writes are atomic, so a broken entry means something is wrong.
    """
    path = torch_cache_path(kind, key)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        return None


def torch_cache_put(kind: str, key: str, obj: Any) -> Path:
    """Store ``obj`` with ``torch.save`` under ``<root>/<kind>/<key>.pt`` atomically.

    Concurrent writers of the same key are harmless: each writes its own temporary file
    and the last rename wins with a complete file (same key, so the same content).
    Returns the path written.
    """
    path = torch_cache_path(kind, key)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """Read a JSON file, returning ``default`` when it is missing or unreadable.

    For small bookkeeping files (memoised hashes) that are safe to rebuild; do not use it
    for results, where a broken file must be an error.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default
