"""Profile overrides: every given field is honoured (None / "all" where a field allows
it) or refused with the reason, never dropped."""

from __future__ import annotations

import pytest

from prunebench.harness.errors import UsageError
from prunebench.harness.profiles import NULLABLE_FIELDS, PROFILES, Profile, get_profile, with_overrides
from prunebench.harness.spec import RunSpec

CI = get_profile("ci")


@pytest.mark.parametrize("value", [None, "all", "ALL", " all "])
@pytest.mark.parametrize("field", ["eval_samples", "task_limit"])
def test_eval_samples_and_task_limit_accept_none_and_all(field, value):
    assert getattr(CI, field) is not None
    assert getattr(with_overrides(CI, **{field: value}), field) is None
    assert set(NULLABLE_FIELDS) == {"eval_samples", "task_limit"}


@pytest.mark.parametrize("field", ["calibration_samples", "calibration_seqlen", "eval_seqlen", "batch_size",
                                   "task_batch_size", "task_max_length", "calibration_source", "timing", "tasks"])
@pytest.mark.parametrize("value", [None, "all"])
def test_other_fields_refuse_none_and_all(field, value):
    with pytest.raises(UsageError, match="cannot be 'all'/None; only eval_samples, task_limit can"):
        with_overrides(CI, **{field: value})


def test_an_unknown_field_is_refused_naming_the_valid_ones():
    with pytest.raises(UsageError, match=r"unknown profile field\(s\) \['eval_sample'\]; valid: name, calibration_source"):
        with_overrides(CI, eval_sample=4)


@pytest.mark.parametrize("field", ["calibration_samples", "calibration_seqlen", "eval_samples", "eval_seqlen", "batch_size",
                                   "task_batch_size", "task_max_length", "task_limit"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes_are_refused(field, value):
    with pytest.raises(UsageError, match="at least 1|must be positive"):
        with_overrides(CI, **{field: value})


def test_overrides_are_applied_and_the_named_profile_is_unchanged():
    p = with_overrides(CI, eval_samples=3, calibration_seqlen=64, eval_sources=["wiki-offline"], tasks=["piqa"])
    assert (p.eval_samples, p.calibration_seqlen, p.eval_sources, p.tasks) == (3, 64, ("wiki-offline",), ("piqa",))
    assert p.calibration_samples == CI.calibration_samples and p.name == "ci"
    assert PROFILES["ci"] == CI and CI.eval_samples == 8
    assert with_overrides(CI) == CI


def test_a_spec_resolves_its_profile_with_its_overrides():
    spec = RunSpec(profile="ci", profile_overrides={"eval_samples": "all", "task_limit": None, "batch_size": 2})
    p = spec.resolved_profile()
    assert isinstance(p, Profile) and (p.eval_samples, p.task_limit, p.batch_size) == (None, None, 2)
    with pytest.raises(UsageError, match="batch size must be at least 1"):
        RunSpec(profile="ci", profile_overrides={"batch_size": 0}).resolved_profile()


def test_an_unknown_profile_is_refused_naming_the_valid_ones():
    with pytest.raises(UsageError, match="unknown profile 'fast'; valid profiles: ci, offline, paper"):
        get_profile("fast")
