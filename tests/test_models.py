"""Tests of prunebench.harness.models: the embedded SmolLM2, the GGUF cache, paths, hub ids, options.

The embedded model is loaded once per module through the default cache (shared with the
rest of the suite, so its ~30 s conversion happens once per machine). One test converts
the GGUF again into a private cache to exercise the real conversion on every run; the
atomicity tests use a tiny fake conversion and cost milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from prunebench.harness import models
from prunebench.harness.cache import CACHE_ENV, default_permissions
from prunebench.harness.errors import UsageError
from prunebench.harness.models import MODELS, SourceModel, convert_gguf, gguf_sha256, list_models, load_source_model
from prunebench.harness.testing import tiny_model

EMBEDDED = "smollm2-135m"


def _gguf_file() -> Path:
    return MODELS[EMBEDDED].gguf_path()


@pytest.fixture(scope="module")
def embedded() -> SourceModel:
    return load_source_model(EMBEDDED)


def _forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``models.<name>`` fail the test if it is called."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"models.{name} must not be called here")

    monkeypatch.setattr(models, name, boom)


def _converting_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == models.__name__ and "converting" in r.getMessage()]


# --------------------------------------------------------------------------- registry


def test_list_models_names_the_embedded_model() -> None:
    assert list_models() == sorted(MODELS)
    assert EMBEDDED in list_models()
    path = _gguf_file()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------- embedded model


@pytest.mark.real
def test_embedded_model_is_smollm2(embedded: SourceModel) -> None:
    model, cfg = embedded.model, embedded.model.config
    assert isinstance(model, LlamaForCausalLM)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert len(model.model.layers) == 30
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # freezing is the caller's call
    assert embedded.name == EMBEDDED
    assert embedded.fingerprint == f"gguf-sha256:{hashlib.sha256(_gguf_file().read_bytes()).hexdigest()}"


@pytest.mark.real
def test_embedded_model_knows_paris(embedded: SourceModel) -> None:
    """Greedy text is only sensible if the GGUF q/k permutation was undone."""
    tok = embedded.tokenizer
    batch = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = embedded.model.generate(**batch, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.real
def test_second_load_hits_cache(
    embedded: SourceModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint, sha = convert_gguf(_gguf_file())  # cached by the fixture already
    marker = checkpoint / "prunebench-source.json"
    before = (checkpoint.stat().st_ino, marker.stat().st_mtime_ns, (checkpoint / "model.safetensors").stat().st_mtime_ns)
    _forbid(monkeypatch, "_convert_into")  # no reconversion ...
    monkeypatch.setattr(models.hashlib, "sha256", None)  # ... and no re-hashing of the 98 MB file
    caplog.set_level(logging.INFO, logger=models.__name__)

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
    caplog.set_level(logging.INFO, logger=models.__name__)
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

    _forbid(monkeypatch, "_convert_into")
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
    monkeypatch.setattr(models, "_dequantize_gguf", lambda gguf: tiny_model("llama-gqa"))
    path = tmp_path / "Tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def test_crashed_conversion_leaves_nothing(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_gguf_tokenizer", lambda gguf: _FakeTokenizer(fail=True))
    with pytest.raises(RuntimeError, match="crash while saving"):
        convert_gguf(fake_gguf)
    models_dir = models.models_cache_dir()
    assert sorted(p.name for p in models_dir.iterdir() if p.is_dir()) == []


def test_conversion_replaces_debris_and_is_cached(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_gguf_tokenizer", lambda gguf: _FakeTokenizer())
    sha = gguf_sha256(fake_gguf)
    models_dir = models.models_cache_dir()
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

    _forbid(monkeypatch, "_dequantize_gguf")
    assert convert_gguf(fake_gguf) == (dest, sha)  # hit

    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"changed")  # new content: new key
    monkeypatch.setattr(models, "_dequantize_gguf", lambda gguf: tiny_model("llama-gqa"))
    changed, new_sha = convert_gguf(fake_gguf)
    assert new_sha != sha and changed != dest and changed.name.startswith("tiny-")


def test_gguf_hash_is_memoised(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert gguf_sha256(fake_gguf) == expected
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", None)  # a second hash would crash
    assert gguf_sha256(fake_gguf) == expected
    monkeypatch.setattr(models.hashlib, "sha256", real_sha256)
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
    memo = json.loads((models.models_cache_dir() / "gguf-sha256.json").read_text())
    assert sorted(Path(p).name for p in memo) == ["Third.gguf", "Tiny.gguf"]


# --------------------------------------------------------------------------- local directories


@pytest.mark.real
def test_local_checkpoint_dir_loads_with_fingerprint(embedded: SourceModel, tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny-llama"
    tiny_model("llama-gqa").save_pretrained(ckpt)
    embedded.tokenizer.save_pretrained(ckpt)

    loaded = load_source_model(str(ckpt), dtype="float16")
    assert isinstance(loaded.model, LlamaForCausalLM) and loaded.model.dtype == torch.float16
    assert loaded.name == str(ckpt.resolve())
    fp = loaded.fingerprint
    assert fp.startswith("local:") and models._local_fingerprint(ckpt) == fp  # stable

    weights = ckpt / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten weights
    fp_touched = models._local_fingerprint(ckpt)
    assert fp_touched != fp
    config = ckpt / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"_note": 1, "rms_norm_eps"'))
    assert models._local_fingerprint(ckpt) not in (fp, fp_touched)


def test_directory_without_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="config.json"):
        load_source_model(str(tmp_path))


# --------------------------------------------------------------------------- bad input fails fast


def test_bad_dtype_lists_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "convert_gguf")
    with pytest.raises(UsageError, match="float32, bfloat16, float16"):
        load_source_model(EMBEDDED, dtype="fp32")


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", ""])
def test_bad_device_lists_forms(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "convert_gguf")
    with pytest.raises(UsageError, match="cpu, cuda, cuda:N"):
        load_source_model(EMBEDDED, device=device)


def test_unavailable_cuda_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "convert_gguf")
    if torch.cuda.is_available():
        with pytest.raises(UsageError, match="does not exist"):
            load_source_model(EMBEDDED, device=f"cuda:{torch.cuda.device_count()}")
    else:
        for device in ("cuda", "cuda:0"):
            with pytest.raises(UsageError, match="CUDA is not available"):
                load_source_model(EMBEDDED, device=device)


@pytest.mark.parametrize("name", ["no-such-model", "SmolLM2", "llama 7b", "a/b/c/d@"])
def test_unknown_name_fails_without_network(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "_load_hub")
    start = time.perf_counter()
    with pytest.raises(UsageError, match=EMBEDDED) as info:
        load_source_model(name)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["./missing-dir", "/nonexistent/model.gguf", "~/no/such/checkpoint"])
def test_missing_path_is_a_usage_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "_load_hub")
    with pytest.raises(UsageError, match="no such file or directory"):
        load_source_model(name)


def test_non_gguf_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf file"):
        load_source_model(str(path))


def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hub switched off, or unreachable, a hub id fails in seconds, naming the offline models."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _forbid(monkeypatch, "_hub_reachable")
    start = time.perf_counter()
    with pytest.raises(UsageError, match=f"HF_HUB_OFFLINE.*{EMBEDDED}") as info:
        load_source_model("prunebench-tests/no-such-model")
    assert "\n" not in str(info.value)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_hub_offline_requested", lambda: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UsageError, match=f"unreachable.*{EMBEDDED}"):
        load_source_model("prunebench-tests/no-such-model@main")
    assert time.perf_counter() - start < 15
