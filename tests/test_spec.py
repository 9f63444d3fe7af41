"""Run identities: the protocol leaves out method, sparsity and seed and covers every
measurement condition; the cell id separates everything that makes two runs different
(0.12 vs 0.125, seeds, parameters, tuning) but not a recipe's name; result names are
readable and end in the cell id; seeds parse strictly; specs round-trip through dicts."""

from __future__ import annotations

import dataclasses

import pytest

from prunebench.harness.errors import UsageError
from prunebench.harness.metrics import metric_settings, select_metrics
from prunebench.harness.session import RunSession
from prunebench.harness.spec import (
    ID_LENGTH,
    RunSpec,
    cell_of,
    parse_seeds,
    protocol_id,
    protocol_of,
    result_name,
)


def _spec(**kw) -> RunSpec:
    base = {"method": "wanda-sp", "sparsity": 0.2, "profile": "ci", "zeroshot": False, "timing": False, "metrics": ["ppl"]}
    return RunSpec(**(base | kw))


def _protocol(spec: RunSpec, host) -> dict:
    profile = spec.resolved_profile()
    chosen = select_metrics(host.metrics, spec, profile)
    return protocol_of(spec, profile, metric_settings(chosen, spec, profile))


def _pid(spec: RunSpec, host) -> str:
    return protocol_id(_protocol(spec, host))


# ----- protocol ------------------------------------------------------------------------------------
def test_method_sparsity_and_seed_are_not_part_of_the_protocol(host):
    a = _spec(method="wanda-sp", sparsity=0.2, seed=0)
    b = _spec(method="flap", sparsity=0.5, seed=7)
    assert _pid(a, host) == _pid(b, host)
    assert len(_pid(a, host)) == ID_LENGTH


def test_the_device_index_is_not_part_of_the_protocol_but_its_type_is(host):
    assert _protocol(_spec(device="cuda:0"), host) == _protocol(_spec(device="cuda:1"), host)
    assert _protocol(_spec(device="cuda:0"), host)["device_type"] == "cuda"
    assert _pid(_spec(device="cuda:0"), host) != _pid(_spec(device="cpu"), host)


@pytest.mark.parametrize("change", [
    {"profile_overrides": {"eval_samples": 4}},
    {"profile_overrides": {"eval_seqlen": 128}},
    {"profile_overrides": {"calibration_seqlen": 128}},
    {"profile_overrides": {"calibration_samples": 4}},
    {"profile_overrides": {"calibration_source": "books-offline"}},
    {"profile_overrides": {"batch_size": 2}},
    {"dtype": "float64"},
    {"model": "org/other-model"},
    {"metrics": None, "zeroshot": True},  # zero-shot added (the defaults)
    {"metrics": ["ppl", "zeroshot"], "zeroshot": True},
    {"metrics": ["ppl", "timing"], "timing": True},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_measurement_condition_changes_the_protocol(host, change):
    assert _pid(_spec(**change), host) != _pid(_spec(), host)


def test_zero_shot_sizes_are_in_the_protocol_once_zero_shot_is_measured(host):
    zs = {"metrics": ["ppl", "zeroshot"], "zeroshot": True}
    assert _pid(_spec(**zs), host) != _pid(_spec(**zs, profile_overrides={"task_limit": 5}), host)
    # ... and not while it is not measured
    assert _pid(_spec(), host) == _pid(_spec(profile_overrides={"task_limit": 5}), host)


def test_a_metric_without_settings_does_not_split_the_protocol(host):
    with_kv = _spec(metrics=["ppl", "kv-cache"])
    assert host.metrics["kv-cache"].settings(with_kv, with_kv.resolved_profile()) is None
    assert _pid(with_kv, host) == _pid(_spec(), host)
    assert "kv-cache" not in _protocol(with_kv, host)["metrics"]
    assert set(_protocol(with_kv, host)["metrics"]) == {"ppl"}


def test_protocol_records_the_calibration_and_metric_settings(host):
    spec = _spec(profile_overrides={"calibration_samples": 3, "calibration_seqlen": 64, "eval_samples": 5})
    protocol = _protocol(spec, host)
    assert protocol["calibration"] == {"source": "wiki-offline", "samples": 3, "seqlen": 64, "batch_size": 4}
    assert protocol["metrics"]["ppl"] == {"sources": ["wiki-offline", "books-offline"], "samples": 5, "seqlen": 256}
    assert "method" not in protocol and "seed" not in protocol and "sparsity" not in protocol


def test_protocol_of_is_what_a_session_records(host):
    spec = _spec()
    session = RunSession(spec, host=host, show_progress=False)
    assert session.protocol == _protocol(spec, host)
    assert session.protocol_id == _pid(spec, host)


# ----- cell ----------------------------------------------------------------------------------------
def _cell(host, **kw) -> str:
    return RunSession(_spec(**kw), host=host, show_progress=False).cell


def test_sparsities_that_print_alike_are_two_cells(host):
    assert _cell(host, sparsity=0.12) != _cell(host, sparsity=0.125)
    assert _cell(host, sparsity=0.2) == _cell(host, sparsity=0.2)


def test_seeds_are_separate_cells(host):
    assert len({_cell(host, seed=s) for s in (0, 1, 2)}) == 3


def test_a_changed_component_parameter_is_another_cell(host):
    assert _cell(host, overrides=["ffn.multiple=16"]) != _cell(host)
    assert _cell(host, overrides=["ffn=keep"]) != _cell(host)


def test_tuning_is_part_of_the_cell(host):
    tuned = _cell(host, tune={"ffn.multiple": [8, 16]})
    assert tuned != _cell(host)
    assert tuned != _cell(host, tune={"ffn.multiple": [8, 32]})


def test_two_names_for_the_same_components_are_one_cell(host):
    # ffn.multiple=8 is wanda-sp's default: the recipe is called differently, its components are the same
    a = RunSession(_spec(), host=host, show_progress=False)
    b = RunSession(_spec(overrides=["ffn.multiple=8"]), host=host, show_progress=False)
    assert a.recipe.name != b.recipe.name
    assert a.cell == b.cell
    protocol = a.protocol
    components = a.recipe.to_dict()["components"]
    assert cell_of(protocol, {"method": "x", "components": components}, 0.2, 0) == \
        cell_of(protocol, {"method": "y", "components": components}, 0.2, 0)


def test_cell_of_separates_protocols_and_the_budget_setting_none(host):
    spec = _spec()
    p = _protocol(spec, host)
    q = _protocol(_spec(dtype="float64"), host)
    recipe = host.resolve("wanda-sp").to_dict()
    assert cell_of(p, recipe, 0.2, 0) != cell_of(q, recipe, 0.2, 0)
    assert cell_of(p, recipe, None, 0) != cell_of(p, recipe, 0.0, 0)
    assert cell_of(p, recipe, 0.2, 0) == cell_of(p, recipe, 0.2, 0, tune={})


# ----- result name ---------------------------------------------------------------------------------
def test_result_name_is_a_readable_prefix_and_the_cell_id():
    spec = _spec(model="smollm2-135m", sparsity=0.125, seed=3)
    name = result_name(spec, "wanda-sp[ffn=keep]", "0123456789ab")
    assert name == "smollm2-135m__wanda-sp_ffn=keep___s0.125__seed3__0123456789ab.json"
    assert name.removesuffix(".json").rsplit("__", 1)[-1] == "0123456789ab"
    assert result_name(dataclasses.replace(spec, sparsity=None), "slicegpt", "c" * 12).startswith(
        "smollm2-135m__slicegpt__sset__seed3__")


def test_a_long_recipe_name_keeps_its_method_and_a_plus_sign():
    spec = _spec(model="smollm2-135m", sparsity=0.3, seed=0)
    long = "intraslice[importance=mask-grad-pca,importance.grad_group=8,importance.head_score=summed]"
    assert result_name(spec, long, "c" * 12).startswith("smollm2-135m__intraslice_importance=mask-grad-pca_")
    assert result_name(spec, "intraslice+", "c" * 12).startswith("smollm2-135m__intraslice+__s0.3__")


def test_result_name_of_a_path_like_model_has_no_separators():
    name = result_name(_spec(model="/models/org/some model"), "m", "c" * 12)
    assert "/" not in name and " " not in name and name.endswith("__" + "c" * 12 + ".json")


def test_a_session_result_path_is_named_by_its_cell(host, tmp_path):
    session = RunSession(_spec(), host=host, show_progress=False)
    path = session.result_path(tmp_path)
    assert path.parent == tmp_path
    assert path.name == result_name(session.spec, session.recipe.name, session.cell)


# ----- seeds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seeds", [
    ("0,1,2", [0, 1, 2]),
    ("0-3", [0, 1, 2, 3]),
    ("5", [5]),
    (" 1, 3-4 ,7", [1, 3, 4, 7]),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0,0", "0-2,1", "-1", "a", "1.5", "", "3-1", "1-2-3", ","])
def test_parse_seeds_refuses_repeats_negatives_and_garbage(text):
    with pytest.raises(UsageError, match="seeds"):
        parse_seeds(text)


# ----- dicts ---------------------------------------------------------------------------------------
def test_spec_round_trips_through_a_dict_and_ignores_unknown_keys():
    spec = _spec(overrides=["ffn=keep"], profile_overrides={"eval_samples": None}, seed=4, sparsity=None,
                 tune={"ffn.multiple": [8, 16]}, save_dir="/tmp/x", use_cache=False)
    data = spec.to_dict()
    assert RunSpec.from_dict(data) == spec
    assert RunSpec.from_dict({**data, "protocol": {"a": 1}, "protocol_id": "abc", "saved_to": None}) == spec
    assert RunSpec.from_dict({"method": "flap"}) == RunSpec(method="flap")
