"""Tests of prunebench.harness.gguf: the GGUF hash memo and the cached, atomic conversion.

The embedded model comes from the session fixture in tests/conftest.py (its ~30 s
conversion happens once per machine, into the default cache). One test converts the GGUF
again into a private cache to exercise the real conversion on every run; the atomicity
tests use a tiny fake conversion and cost milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from prunebench.harness import gguf as gguf_module
from prunebench.harness.cache import CACHE_ENV, default_permissions
from prunebench.harness.gguf import convert_gguf, gguf_sha256
from prunebench.harness.model_registry import MODELS
from prunebench.harness.models import SourceModel, load_source_model
from prunebench.harness.testing import tiny_model

EMBEDDED = "smollm2-135m"


def _gguf_file() -> Path:
    return MODELS[EMBEDDED].gguf_path()


@pytest.fixture(scope="module")
def embedded(smollm2: SourceModel) -> SourceModel:
    return smollm2


def _forbid(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> None:
    """Make ``module.<name>`` fail the test if it is called."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{module.__name__}.{name} must not be called here")

    monkeypatch.setattr(module, name, boom)


def _converting_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == gguf_module.__name__ and "converting" in r.getMessage()]


# --------------------------------------------------------------------------- the embedded GGUF, converted for real


@pytest.mark.real
def test_second_load_hits_cache(
    embedded: SourceModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint, sha = convert_gguf(_gguf_file())  # cached by the fixture already
    marker = checkpoint / "prunebench-source.json"
    before = (checkpoint.stat().st_ino, marker.stat().st_mtime_ns, (checkpoint / "model.safetensors").stat().st_mtime_ns)
    _forbid(monkeypatch, gguf_module, "_convert_into")  # no reconversion ...
    monkeypatch.setattr(gguf_module.hashlib, "sha256", None)  # ... and no re-hashing of the 98 MB file
    caplog.set_level(logging.INFO, logger=gguf_module.__name__)

    start = time.perf_counter()
    again = load_source_model(EMBEDDED, dtype="bfloat16")
    elapsed = time.perf_counter() - start

    after = (checkpoint.stat().st_ino, marker.stat().st_mtime_ns, (checkpoint / "model.safetensors").stat().st_mtime_ns)
    assert after == before
    assert _converting_logs(caplog) == []
    assert again.fingerprint == embedded.fingerprint == f"gguf-sha256:{sha}"
    assert again.model.dtype == torch.bfloat16
    assert elapsed < 20, f"cached load took {elapsed:.1f} s"


@pytest.mark.real
def test_gguf_path_converts_into_fresh_cache(
    embedded: SourceModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A .gguf path goes through the real conversion (one ~30 s run) and then the cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    caplog.set_level(logging.INFO, logger=gguf_module.__name__)
    gguf = _gguf_file()

    first = load_source_model(str(gguf))
    assert len(_converting_logs(caplog)) == 1
    assert first.name == str(gguf.resolve())
    assert first.fingerprint == embedded.fingerprint  # same bytes, same fingerprint
    sha = first.fingerprint.split(":", 1)[1]
    checkpoint = root / "models" / f"{EMBEDDED}-{sha[:16]}"
    assert (checkpoint / "prunebench-source.json").is_file()
    assert (checkpoint / "model.safetensors").is_file()
    assert oct(checkpoint.stat().st_mode & 0o777) == oct(default_permissions(directory=True))
    leftovers = [p.name for p in (root / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert (root / "models" / "gguf-sha256.json").is_file()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(first.model.get_parameter(name), embedded.model.get_parameter(name)), name
    del first

    _forbid(monkeypatch, gguf_module, "_convert_into")
    caplog.clear()
    second = load_source_model(str(gguf))
    assert _converting_logs(caplog) == []
    assert second.fingerprint == embedded.fingerprint


# --------------------------------------------------------------------------- conversion mechanics (fake, fast)


class _FakeTokenizer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        if self.fail:
            raise RuntimeError("crash while saving")
        Path(path, "tokenizer_config.json").write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and a small file standing in for a GGUF; the dequantizer is faked."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_module, "_dequantize_gguf", lambda gguf: tiny_model("llama-gqa"))
    path = tmp_path / "Tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def test_crashed_conversion_leaves_nothing(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_module, "_gguf_tokenizer", lambda gguf: _FakeTokenizer(fail=True))
    with pytest.raises(RuntimeError, match="crash while saving"):
        convert_gguf(fake_gguf)
    models_dir = gguf_module.models_cache_dir()
    assert sorted(p.name for p in models_dir.iterdir() if p.is_dir()) == []


def test_conversion_replaces_debris_and_is_cached(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_module, "_gguf_tokenizer", lambda gguf: _FakeTokenizer())
    sha = gguf_sha256(fake_gguf)
    models_dir = gguf_module.models_cache_dir()
    dest = models_dir / f"tiny-{sha[:16]}"
    (models_dir / f".{dest.name}.tmp-deadbeef").mkdir(parents=True)  # a crashed converter's temp dir
    dest.mkdir()
    (dest / "config.json").write_text("{}")  # an incomplete directory: no marker

    checkpoint, digest = convert_gguf(fake_gguf)
    assert (checkpoint, digest) == (dest, sha)
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "prunebench-source.json"} <= {
        p.name for p in dest.iterdir()
    }
    assert sorted(p.name for p in models_dir.iterdir()) == ["gguf-sha256.json", dest.name, f"{dest.name}.lock"]

    _forbid(monkeypatch, gguf_module, "_dequantize_gguf")
    assert convert_gguf(fake_gguf) == (dest, sha)  # hit

    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"changed")  # new content: new key
    monkeypatch.setattr(gguf_module, "_dequantize_gguf", lambda gguf: tiny_model("llama-gqa"))
    changed, new_sha = convert_gguf(fake_gguf)
    assert new_sha != sha and changed != dest and changed.name.startswith("tiny-")


def test_gguf_hash_is_memoised(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert gguf_sha256(fake_gguf) == expected
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(gguf_module.hashlib, "sha256", None)  # a second hash would crash
    assert gguf_sha256(fake_gguf) == expected
    monkeypatch.setattr(gguf_module.hashlib, "sha256", real_sha256)
    with open(fake_gguf, "ab") as fh:  # same path, new size and mtime: re-hashed
        fh.write(b"x")
    assert gguf_sha256(fake_gguf) == hashlib.sha256(fake_gguf.read_bytes()).hexdigest() != expected

    # Entries of deleted files are dropped on the next write, so the memo cannot grow forever.
    gone = fake_gguf.with_name("Gone.gguf")
    gone.write_bytes(b"GGUF gone")
    gguf_sha256(gone)
    gone.unlink()
    third = fake_gguf.with_name("Third.gguf")
    third.write_bytes(b"GGUF third")
    gguf_sha256(third)
    memo = json.loads((gguf_module.models_cache_dir() / "gguf-sha256.json").read_text())
    assert sorted(Path(p).name for p in memo) == ["Third.gguf", "Tiny.gguf"]
