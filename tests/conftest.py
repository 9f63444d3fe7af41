"""Shared fixtures: tiny random models of every family, and the real embedded model."""

from __future__ import annotations

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.manager import PluginHost
from prunebench.harness.testing import tiny_model

FAMILIES = ("llama-mha", "llama-gqa", "llama-bias", "qwen2", "phi3", "phi3-partial")


@pytest.fixture(scope="session")
def host() -> PluginHost:
    return PluginHost()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_pair(family):
    """(source HF model, converted canonical model) of one family."""
    source = tiny_model(family)
    return source, to_pruned(source)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (converted once to the safetensors cache)."""
    from prunebench.harness.models import load_source_model

    return load_source_model("smollm2-135m")
