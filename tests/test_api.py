"""The dense-metrics cache key changes with everything that changes the dense metrics, so a
grid never reuses numbers measured under other settings."""

from __future__ import annotations

import dataclasses

import torch

from prunebench.harness.api import RunSpec, dense_metrics_key

WINDOWS = {"wiki-offline": torch.arange(32).reshape(2, 16)}


def _key(spec: RunSpec, windows=WINDOWS, max_positions: int = 8192, **profile_changes) -> str:
    profile = dataclasses.replace(spec.resolved_profile(), **profile_changes)
    return dense_metrics_key(spec, profile, "model-a", windows, max_positions)


def test_every_zero_shot_setting_is_in_the_key():
    spec = RunSpec(profile="ci")
    base = _key(spec)
    assert _key(spec) == base
    changed = [
        _key(spec, task_max_length=256),
        _key(spec, task_limit=21),
        _key(spec, task_batch_size=8),
        _key(spec, tasks=("arc_easy",)),
        _key(dataclasses.replace(spec, seed=1)),
        _key(dataclasses.replace(spec, dtype="bfloat16")),
        _key(spec, windows={"wiki-offline": torch.arange(32).reshape(2, 16) + 1}),
        dense_metrics_key(spec, spec.resolved_profile(), "model-b", WINDOWS, 8192),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_the_effective_context_is_what_counts():
    spec = RunSpec(profile="ci")  # task_max_length 2048
    assert _key(spec, max_positions=1024) != _key(spec, max_positions=8192)
    assert _key(spec, max_positions=4096) == _key(spec, max_positions=8192)  # both cut at 2048


def test_without_zero_shot_only_perplexity_settings_count():
    spec = RunSpec(profile="ci", zeroshot=False)
    assert _key(spec, task_max_length=256) == _key(spec) == _key(spec, task_limit=5)
