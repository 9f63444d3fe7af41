"""Tests of prunebench.harness.models: the embedded SmolLM2, local checkpoints, hub ids, options.

The embedded model is loaded once per module through the default cache (shared with the
rest of the suite, so its ~30 s conversion happens once per machine). The conversion and
its cache are tested in tests/test_gguf.py, the registry in tests/test_model_registry.py,
the hub probe in tests/test_hub.py.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from prunebench.harness import gguf, hub, models
from prunebench.harness.errors import UsageError
from prunebench.harness.model_registry import MODELS
from prunebench.harness.models import SourceModel, load_source_model
from prunebench.harness.testing import tiny_model

EMBEDDED = "smollm2-135m"


def _gguf_file() -> Path:
    return MODELS[EMBEDDED].gguf_path()


@pytest.fixture(scope="module")
def embedded() -> SourceModel:
    return load_source_model(EMBEDDED)


def _forbid(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> None:
    """Make ``module.<name>`` fail the test if it is called."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{module.__name__}.{name} must not be called here")

    monkeypatch.setattr(module, name, boom)


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
    _forbid(monkeypatch, gguf, "convert_gguf")
    with pytest.raises(UsageError, match="float32, float64, bfloat16, float16"):
        load_source_model(EMBEDDED, dtype="fp32")


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", ""])
def test_bad_device_lists_forms(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, gguf, "convert_gguf")
    with pytest.raises(UsageError, match="cpu, cuda, cuda:N"):
        load_source_model(EMBEDDED, device=device)


def test_unavailable_cuda_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, gguf, "convert_gguf")
    if torch.cuda.is_available():
        with pytest.raises(UsageError, match="does not exist"):
            load_source_model(EMBEDDED, device=f"cuda:{torch.cuda.device_count()}")
    else:
        for device in ("cuda", "cuda:0"):
            with pytest.raises(UsageError, match="CUDA is not available"):
                load_source_model(EMBEDDED, device=device)


@pytest.mark.parametrize("name", ["no-such-model", "SmolLM2", "llama 7b", "a/b/c/d@"])
def test_unknown_name_fails_without_network(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, models, "_load_hub")
    start = time.perf_counter()
    with pytest.raises(UsageError, match=EMBEDDED) as info:
        load_source_model(name)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["./missing-dir", "/nonexistent/model.gguf", "~/no/such/checkpoint"])
def test_missing_path_is_a_usage_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, models, "_load_hub")
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
    _forbid(monkeypatch, hub, "reachable")
    start = time.perf_counter()
    with pytest.raises(UsageError, match=f"HF_HUB_OFFLINE.*{EMBEDDED}") as info:
        load_source_model("prunebench-tests/no-such-model")
    assert "\n" not in str(info.value)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "offline_requested", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    with pytest.raises(UsageError, match=f"unreachable.*{EMBEDDED}"):
        load_source_model("prunebench-tests/no-such-model@main")
    assert time.perf_counter() - start < 15
