"""Metrics as plugins (harness.metrics) and the built-in ones (harness.builtin_metrics):
selection refuses what cannot be measured as asked, perplexity's per-window units agree
with its perplexity, the KV-cache size is read off the kept KV heads and dims, and the
zero-shot average carries the combined standard error of its tasks."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.builtin_metrics import (
    KVCacheMetric,
    PerplexityMetric,
    TimingMetric,
    ZeroShotMetric,
    kv_cache_bytes_per_token,
)
from prunebench.harness.errors import UsageError
from prunebench.harness.metrics import Metric, MetricContext, default_metric_names, metric_settings, select_metrics
from prunebench.harness.spec import RunSpec
from prunebench.harness.surgery import apply_attention_plan, attention_plan_of, keep_heads, keep_qk_pairs
from prunebench.harness.testing import tiny_model


def _spec(**kw) -> RunSpec:
    return RunSpec(**({"method": "wanda-sp", "sparsity": 0.2, "profile": "ci"} | kw))


def _names(host, spec: RunSpec, offloaded: bool = False) -> list[str]:
    return [m.name for m in select_metrics(host.metrics, spec, spec.resolved_profile(), offloaded=offloaded)]


# ----- selection -----------------------------------------------------------------------------------
def test_the_built_in_metrics_are_registered(host):
    assert {"ppl", "zeroshot", "timing", "kv-cache"} <= set(host.metrics)


def test_the_defaults_are_every_default_metric_less_what_is_switched_off(host):
    assert set(_names(host, _spec())) == {"ppl", "zeroshot", "timing", "kv-cache"}
    assert set(_names(host, _spec(zeroshot=False))) == {"ppl", "timing", "kv-cache"}
    assert set(_names(host, _spec(timing=False))) == {"ppl", "zeroshot", "kv-cache"}
    assert set(_names(host, _spec(zeroshot=False, timing=False))) == {"ppl", "kv-cache"}
    assert "zeroshot" not in _names(host, _spec(profile_overrides={"tasks": []}))  # no tasks: nothing to measure


def test_a_metric_that_is_not_a_default_is_measured_only_when_named(host):
    class Extra(Metric):
        name, keys, default = "extra", ("extra",), False

        def measure(self, ctx):
            return {"extra": 1}

    metrics = {**host.metrics, "extra": Extra()}
    spec = _spec(zeroshot=False, timing=False)
    assert "extra" not in default_metric_names(metrics, spec, spec.resolved_profile())
    chosen = select_metrics(metrics, dataclasses.replace(spec, metrics=["ppl", "extra"]), spec.resolved_profile())
    assert [m.name for m in chosen] == ["ppl", "extra"]


def test_named_metrics_are_taken_as_given_once_each(host):
    assert _names(host, _spec(metrics=["kv-cache", "ppl", "ppl"])) == ["kv-cache", "ppl"]


def test_an_unknown_metric_is_refused_naming_the_valid_ones(host):
    with pytest.raises(UsageError, match=r"unknown metric\(s\) nope; valid metrics: kv-cache, ppl, timing, zeroshot"):
        _names(host, _spec(metrics=["ppl", "nope"]))


def test_naming_a_metric_that_is_switched_off_is_refused(host):
    with pytest.raises(UsageError, match="zero-shot is switched off"):
        _names(host, _spec(metrics=["zeroshot"], zeroshot=False))
    with pytest.raises(UsageError, match="timing is switched off"):
        _names(host, _spec(metrics=["timing"], timing=False))


def test_two_metrics_writing_one_key_are_refused(host):
    class OtherPerplexity(Metric):
        name, keys = "ppl2", ("ppl",)

        def measure(self, ctx):
            return {"ppl": {}}

    metrics = {**host.metrics, "ppl2": OtherPerplexity()}
    spec = _spec(metrics=["ppl", "ppl2"])
    with pytest.raises(UsageError, match=r"'ppl' and 'ppl2' both write 'ppl'"):
        select_metrics(metrics, spec, spec.resolved_profile())


def test_a_metric_that_cannot_run_offloaded_is_refused_for_an_offloaded_run(host):
    with pytest.raises(UsageError, match="'timing' cannot run on an offloaded model"):
        _names(host, _spec(metrics=["ppl", "timing"]), offloaded=True)
    assert _names(host, _spec(metrics=["ppl", "kv-cache"]), offloaded=True) == ["ppl", "kv-cache"]
    assert _names(host, _spec(metrics=["ppl", "timing"])) == ["ppl", "timing"]


def test_each_metric_checks_its_settings_before_any_compute(host):
    with pytest.raises(UsageError, match="unknown zero-shot task"):
        _names(host, _spec(profile_overrides={"tasks": ["no_such_task"]}))


def test_metric_settings_are_what_the_protocol_records(host):
    spec = _spec(metrics=["ppl", "kv-cache", "timing"])
    profile = spec.resolved_profile()
    settings = metric_settings(select_metrics(host.metrics, spec, profile), spec, profile)
    assert settings == {"ppl": {"sources": ["wiki-offline", "books-offline"], "samples": 8, "seqlen": 256},
                        "kv-cache": None, "timing": dict(profile.timing)}


# ----- perplexity ----------------------------------------------------------------------------------
def _ctx(model, windows: torch.Tensor, phase: str = "dense", dense: dict | None = None) -> MetricContext:
    spec = _spec(profile_overrides={"eval_seqlen": windows.shape[1], "eval_samples": windows.shape[0],
                                    "eval_sources": ["src"], "batch_size": 2})
    return MetricContext(phase=phase, spec=spec, profile=spec.resolved_profile(), model=model, tokenizer=None,
                         windows={"src": windows}, device=torch.device("cpu"), dense=dense or {})


def test_perplexity_units_are_per_window_mean_nlls_consistent_with_the_perplexity():
    model = to_pruned(tiny_model("llama-gqa")).to(torch.float64)
    windows = torch.randint(0, 96, (6, 20), generator=torch.Generator().manual_seed(0))
    metric = PerplexityMetric()
    block = metric.measure(_ctx(model, windows))
    assert set(block) == set(metric.keys) and len(block["ppl_windows"]["src"]) == 6
    result = {"spec": {"protocol": {"metrics": {"ppl": {"seqlen": 20}}}}}
    (measure,) = metric.measures(block, result)
    assert measure.key == "ppl:src" and measure.headline and measure.better == "lower" and measure.display == "exp"
    assert measure.value == block["ppl"]["src"]
    assert len(measure.units) == 6
    assert math.exp(sum(measure.units) / len(measure.units)) == pytest.approx(block["ppl"]["src"], rel=1e-12)
    assert measure.units == pytest.approx([x / 19 for x in block["ppl_windows"]["src"]])
    assert len(set(measure.units)) == 6  # real per-window values, not one value repeated


def test_perplexity_of_an_old_result_without_windows_has_no_units():
    (measure,) = PerplexityMetric().measures({"ppl": {"src": 12.0}}, {"spec": {}})
    assert measure.value == 12.0 and measure.units is None


# ----- KV cache ------------------------------------------------------------------------------------
def _kv_width(model) -> int:
    return sum(l.self_attn.num_kv_heads * (l.self_attn.qk_dim + l.self_attn.v_dim) for l in model.model.layers)


def test_kv_cache_bytes_per_token_of_a_float32_model():
    model = to_pruned(tiny_model("llama-gqa"))
    assert kv_cache_bytes_per_token(model) == 4 * _kv_width(model) == 4 * 2 * 2 * (16 + 16)
    assert kv_cache_bytes_per_token(model.to(torch.float64)) == 8 * 2 * 2 * (16 + 16)
    mha = to_pruned(tiny_model("llama-mha"))
    assert kv_cache_bytes_per_token(mha) == 4 * 2 * 4 * (16 + 16)


def test_kv_cache_ratio_follows_the_kept_kv_heads_and_dims():
    dense = to_pruned(tiny_model("llama-gqa"))
    pruned = to_pruned(tiny_model("llama-gqa"))
    # layer 0: both readers of KV head 1 go, so KV head 1 goes; layer 1: q/k keep 4 of 8 rotary pairs
    apply_attention_plan(pruned, 0, keep_heads(attention_plan_of(pruned.model.layers[0].self_attn), [0, 1]))
    plan = attention_plan_of(pruned.model.layers[1].self_attn)
    apply_attention_plan(pruned, 1, keep_qk_pairs(plan, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])))
    metric = KVCacheMetric()
    windows = torch.zeros(1, 4, dtype=torch.long)
    dense_block = metric.measure(_ctx(dense, windows))
    assert dense_block == {"kv_cache": {"bytes_per_token": 4 * 128}}  # no ratio without a dense reference
    pruned_block = metric.measure(_ctx(pruned, windows, phase="pruned", dense=dense_block))
    expected = (1 * (16 + 16) + 2 * (8 + 16)) / (2 * 2 * (16 + 16))
    assert _kv_width(pruned) / _kv_width(dense) == expected == 0.625
    assert pruned_block["kv_cache"]["ratio"] == pytest.approx(expected)
    (measure,) = metric.measures(pruned_block, {})
    assert measure.value == pytest.approx(0.625) and measure.better == "lower"
    assert metric.measures(dense_block, {}) == []


# ----- zero-shot -----------------------------------------------------------------------------------
def test_zero_shot_average_combines_the_task_standard_errors():
    errors = {"arc_easy": 0.02, "piqa": 0.03, "boolq": 0.04}
    block = {"zeroshot": {"scores": {"arc_easy": 0.5, "piqa": 0.6, "boolq": 0.7}, "average": 0.6,
                          "tasks": {t: {"stderr": se} for t, se in errors.items()}}}
    measures = {m.key: m for m in ZeroShotMetric().measures(block, {})}
    assert set(measures) == {"zeroshot:arc_easy", "zeroshot:piqa", "zeroshot:boolq", "zeroshot:average"}
    average = measures["zeroshot:average"]
    assert average.value == 0.6 and average.headline and average.better == "higher"
    assert average.stderr == pytest.approx(math.sqrt(0.02**2 + 0.03**2 + 0.04**2) / 3)
    assert measures["zeroshot:piqa"].stderr == 0.03 and not measures["zeroshot:piqa"].headline
    assert measures["zeroshot:arc_easy"].header == "ARC-e"


def test_zero_shot_average_has_no_standard_error_when_a_task_lacks_one():
    block = {"zeroshot": {"scores": {"arc_easy": 0.5, "piqa": 0.6}, "average": 0.55,
                          "tasks": {"arc_easy": {"stderr": 0.02}, "piqa": {}}}}
    average = {m.key: m for m in ZeroShotMetric().measures(block, {})}["zeroshot:average"]
    assert average.stderr is None and average.value == 0.55
    assert ZeroShotMetric().measures({}, {}) == []


# ----- timing --------------------------------------------------------------------------------------
def test_timing_measures_carry_the_load_flag():
    block = {"timing": {"ratios": {"prefill_speedup": 1.5, "decode_speedup": 1.2},
                        "layer": {"ratios": {"layer_prefill_speedup": 1.4}},
                        "conditions": {"reasons": ["load", "dense drift"]}}}
    measures = {m.key: m for m in TimingMetric().measures(block, {})}
    assert measures["timing:prefill"].value == 1.5 and measures["timing:layer_decode"].value is None
    assert {m.flag for m in measures.values()} == {"load, dense drift"}
    block["timing"]["conditions"] = {"reasons": []}
    assert {m.flag for m in TimingMetric().measures(block, {})} == {None}


class _Fixed(Metric):
    name, keys = "fixed", ("fixed",)
    phases: ClassVar[tuple[str, ...]] = ("pruned",)

    def measure(self, ctx):
        return {"fixed": 1}


def test_a_metric_declares_its_phases_and_has_no_settings_by_default():
    m = _Fixed()
    assert m.phases == ("pruned",) and m.settings(_spec(), _spec().resolved_profile()) is None
    assert TimingMetric.phases == ("pruned",) and not TimingMetric.supports_offload
