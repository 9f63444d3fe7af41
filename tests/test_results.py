"""The results store: schema-1 results upgrade to schema 2 on read (and in place with
migrate); every committed JSON under results/ is either read as results or named as
skipped with a reason; typed results round-trip; an incomplete result is never written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from prunebench.harness.errors import UsageError
from prunebench.harness.profiles import get_profile
from prunebench.harness.results import (
    RESULT_SCHEMA,
    TOP_LEVEL_KEYS,
    RunResult,
    load_results,
    migrate,
    read_result,
    upgrade,
    write_result,
)
from prunebench.harness.session import RunSession
from prunebench.harness.spec import ID_LENGTH, RunSpec, cell_of, protocol_id
from prunebench.harness.testing import fake_result

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
TEMPLATE = RESULTS / "offline" / "smollm2-135m__flap__s0.20__seed0__aa746797cea5.json"


def _schema1(**profile_changes) -> dict:
    """A schema-1 run result shaped like the committed ones (from one of them)."""
    data = json.loads(TEMPLATE.read_text())
    assert data["schema"] == 1
    data["spec"]["protocol"]["profile"].update(profile_changes)
    return data


# ----- upgrading schema 1 --------------------------------------------------------------------------
def test_a_schema_1_result_upgrades_to_schema_2():
    old = _schema1()
    new = upgrade(json.loads(json.dumps(old)))
    assert new["schema"] == RESULT_SCHEMA == 2 and new["kind"] == "run" and new["tuning"] is None
    assert set(TOP_LEVEL_KEYS) <= set(new)
    protocol = new["spec"]["protocol"]
    prof = old["spec"]["protocol"]["profile"]
    assert protocol["model"] == "smollm2-135m" and protocol["dtype"] == "float32" and protocol["device_type"] == "cpu"
    assert protocol["calibration"] == {"source": prof["calibration_source"], "samples": prof["calibration_samples"],
                                       "seqlen": prof["calibration_seqlen"], "batch_size": prof["batch_size"]}
    assert protocol["metrics"]["ppl"] == {"sources": prof["eval_sources"], "samples": prof["eval_samples"],
                                          "seqlen": prof["eval_seqlen"]}
    assert protocol["metrics"]["zeroshot"]["tasks"] == prof["tasks"]  # it measured zero-shot
    assert protocol["metrics"]["timing"] == prof["timing"]
    assert new["spec"]["protocol_id"] == protocol_id(protocol)
    assert new["spec"]["protocol_id_v1"] == old["spec"]["protocol_id"] == "aa746797cea5"
    assert new["spec"]["protocol_v1"] == old["spec"]["protocol"]
    # the inference timings are a metric of the pruned model now
    assert "inference" not in new["timings"] and new["timings"]["stages_s"] == old["timings"]["stages_s"]
    assert new["metrics"]["pruned"]["timing"] == old["timings"]["inference"]
    assert new["metrics"]["pruned"]["ppl"] == old["metrics"]["pruned"]["ppl"]
    assert new["cell"] == cell_of(protocol, old["recipe"], 0.2, 0) and len(new["cell"]) == ID_LENGTH
    assert new["sparsity"] == {"target": 0.2, "achieved": old["sparsity"]["achieved"], "set_by": "target", "spent": None,
                               "allocation_target": None, "paper_count": None}


def test_upgrade_does_not_change_what_it_reads():
    old = _schema1()
    copy = json.loads(json.dumps(old))
    upgrade(copy)
    assert copy == old


def test_a_schema_1_run_without_zero_shot_or_timing_has_neither_in_its_protocol():
    old = _schema1()
    old["spec"]["protocol"]["zeroshot"] = old["spec"]["protocol"]["timing"] = False
    del old["timings"]["inference"]
    protocol = upgrade(old)["spec"]["protocol"]
    assert set(protocol["metrics"]) == {"ppl"}


def test_an_upgraded_result_shares_the_protocol_of_a_new_run_under_the_same_conditions(host):
    ci = json.loads(json.dumps(get_profile("ci").to_dict()))
    old = _schema1(**ci)
    old["spec"]["profile"] = "ci"
    new = upgrade(old)
    session = RunSession(RunSpec(model="smollm2-135m", method="flap", sparsity=0.2, profile="ci"), host=host,
                         show_progress=False)
    assert new["spec"]["protocol"] == session.protocol
    assert new["spec"]["protocol_id"] == session.protocol_id


def test_two_schema_1_results_differing_only_in_sparsity_share_a_protocol_and_not_a_cell():
    a, b = _schema1(), _schema1()
    b["spec"]["sparsity"] = b["sparsity"]["target"] = 0.3
    ua, ub = upgrade(a), upgrade(b)
    assert ua["spec"]["protocol_id"] == ub["spec"]["protocol_id"] and ua["cell"] != ub["cell"]


def test_an_unknown_schema_is_refused():
    with pytest.raises(ValueError, match="schema"):
        upgrade({"schema": 99, "spec": {}, "metrics": {}})


def _assert_typed_round_trip(r: dict) -> None:
    """The typed result keeps everything a read result holds (the sparsity record gains
    the fields an upgraded one lacks: test_an_upgraded_result_has_the_whole_sparsity_record)."""
    back = RunResult.from_dict(r).to_dict()
    assert {k: v for k, v in back.items() if k != "sparsity"} == {k: v for k, v in r.items() if k != "sparsity"}
    assert back["sparsity"].items() >= r["sparsity"].items()


def test_an_upgraded_result_has_the_whole_sparsity_record():
    fields = {"target", "achieved", "set_by", "spent", "allocation_target", "paper_count"}
    assert set(upgrade(_schema1())["sparsity"]) == fields
    bench = json.loads((RESULTS / "offload" / "run1-wanda-intraslice.json").read_text())
    from prunebench.harness.results import results_in

    found, _ = results_in(bench, "run1.json")
    assert all(set(r["sparsity"]) == fields for r in found)


# ----- the committed results -----------------------------------------------------------------------
def _json_keys(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    return list(data) if isinstance(data, dict) else []


@pytest.fixture(scope="module")
def committed():
    return load_results([RESULTS])


def test_every_committed_json_is_read_or_named_as_skipped(committed):
    results, skipped = committed
    seen = {Path(r["path"]).resolve() for r in results} | {Path(p).resolve() for p, _ in skipped}
    assert seen == {p.resolve() for p in RESULTS.rglob("*.json")}
    assert all(why for _, why in skipped)


def test_committed_run_results_read_as_schema_2(committed):
    results, _ = committed
    # A run result is a JSON object with a spec and metrics (tables, sweeps and attribution files are not).
    run_files = [p for p in RESULTS.rglob("*.json")
                 if {"spec", "metrics"} <= set(_json_keys(p))]
    runs = [r for r in results if r["kind"] == "run"]
    assert run_files and {Path(r["path"]).resolve() for r in runs} == {p.resolve() for p in run_files}
    for r in runs:
        assert r["schema"] == 2 and len(r["cell"]) == ID_LENGTH and set(TOP_LEVEL_KEYS) <= set(r)
        assert {"calibration", "metrics"} <= set(r["spec"]["protocol"])
        _assert_typed_round_trip(r)


def test_the_offload_benchmark_files_read_as_offload_results(committed):
    results, skipped = committed
    offload_files = sorted((RESULTS / "offload").glob("*.json"))
    assert offload_files and not [p for p, _ in skipped if Path(p).parent.name == "offload"]
    offload = [r for r in results if r["kind"] == "offload"]
    assert {Path(r["path"]).resolve() for r in offload} == {p.resolve() for p in offload_files}
    for r in offload:
        assert "1.55B" in r["spec"]["model"] and r["schema"] == 2
        dense, pruned = r["metrics"]["dense"]["ppl"], r["metrics"]["pruned"]["ppl"]
        assert set(dense) == set(pruned) == {"wiki-offline"}
        assert dense["wiki-offline"] > 0 and pruned["wiki-offline"] > 0
        assert r["sparsity"]["target"] == 0.3 and 0.25 < r["sparsity"]["achieved"] < 0.35
        _assert_typed_round_trip(r)


@pytest.mark.parametrize("relative", ["speed/speed.json", "speed/speed-run1.json", "speed/speed-run2.json",
                                      "speed/speed-run4-padded.json", "scale/depth_wanda.json", "regression/expected.json"])
def test_tables_and_expectations_are_skipped_with_a_reason(committed, relative):
    _, skipped = committed
    reasons = {Path(p).resolve(): why for p, why in skipped}
    assert "not a run result" in reasons[(RESULTS / relative).resolve()]


def test_read_result_refuses_a_file_without_a_result():
    with pytest.raises(UsageError, match="expected.json"):
        read_result(RESULTS / "regression" / "expected.json")


def test_invalid_json_and_odd_files_are_named_not_dropped(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.json").write_text(TEMPLATE.read_text())
    results, skipped = load_results([tmp_path])
    assert [Path(r["path"]).name for r in results] == ["run.json"]
    reasons = {Path(p).name: why for p, why in skipped}
    assert set(reasons) == {"broken.json", "list.json", "other.json"}
    assert "not valid JSON" in reasons["broken.json"] and "not a JSON object" in reasons["list.json"]


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no such"):
        load_results([tmp_path / "nope"])


# ----- migrate -------------------------------------------------------------------------------------
def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    (folder / "offload").mkdir(parents=True)
    for p in sorted((RESULTS / "offline").glob("*flap*.json")):
        shutil.copy(p, folder / p.name)
    shutil.copy(RESULTS / "offload" / "run1-wanda-intraslice.json", folder / "offload")
    shutil.copy(RESULTS / "regression" / "expected.json", folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_migrate_rewrites_schema_1_files_in_place_once(tmp_path):
    folder = _copy(tmp_path)
    before, _ = load_results([folder])
    schema1 = sorted(p for p in folder.glob("*.json") if json.loads(p.read_text()).get("schema") == 1)
    assert len(schema1) == 3

    done = migrate([folder])
    assert sorted(Path(p) for p, _ in done) == schema1 and all(what == "schema 1 -> 2" for _, what in done)
    for p in schema1:
        data = json.loads(p.read_text())
        assert data["schema"] == 2 and set(data) == set(TOP_LEVEL_KEYS)
    after, _ = load_results([folder])
    key = lambda r: Path(r["path"]).name
    assert [(r["cell"], r["spec"]["protocol_id"]) for r in sorted(after, key=key)] == \
        [(r["cell"], r["spec"]["protocol_id"]) for r in sorted(before, key=key)]

    snapshot = _snapshot(folder)
    assert migrate([folder]) == []  # nothing left to do
    assert _snapshot(folder) == snapshot


def test_migrate_leaves_offload_benchmarks_and_other_files_alone(tmp_path):
    folder = _copy(tmp_path)
    others = {p: p.read_bytes() for p in (folder / "offload" / "run1-wanda-intraslice.json", folder / "expected.json")}
    migrate([folder])
    assert {p: p.read_bytes() for p in others} == others


def test_migrate_dry_run_writes_nothing(tmp_path):
    folder = _copy(tmp_path)
    snapshot = _snapshot(folder)
    done = migrate([folder], dry_run=True)
    assert len(done) == 3 and _snapshot(folder) == snapshot


def test_migrate_names_a_result_it_cannot_upgrade_and_goes_on(tmp_path):
    folder = _copy(tmp_path)
    (folder / "aaa-damaged.json").write_text(json.dumps({"schema": 1, "spec": {"model": "x"}, "metrics": {}}))
    done = dict(migrate([folder]))
    assert "aaa-damaged.json" in " ".join(done) and len(done) == 4


# ----- typed results and writing -------------------------------------------------------------------
@pytest.fixture(scope="module")
def schema2(host) -> dict:
    spec = RunSpec(method="wanda-sp", sparsity=0.3, profile="ci", zeroshot=False, timing=False)
    return fake_result(spec, 30.0, host=host)


def test_run_result_round_trips(schema2):
    assert RunResult.from_dict(schema2).to_dict() == schema2
    with_path = {**schema2, "path": "/x/y.json"}
    typed = RunResult.from_dict(with_path)
    assert typed.path == "/x/y.json" and typed.to_dict() == with_path
    assert typed.sparsity.target == 0.3


def test_run_result_from_a_schema_1_dict_is_upgraded():
    typed = RunResult.from_dict(_schema1())
    assert typed.schema == 2 and typed.kind == "run" and typed.sparsity.achieved > 0


def test_write_result_writes_exactly_the_schema_keys(tmp_path, schema2):
    path = write_result(tmp_path / "deep" / "r.json", {**schema2, "path": "ignored", "extra": 1})
    assert json.loads(path.read_text()) == schema2


@pytest.mark.parametrize("missing", ["tuning", "cell", "sparsity", "environment"])
def test_write_result_refuses_an_incomplete_result_and_writes_nothing(tmp_path, schema2, missing):
    incomplete = {k: v for k, v in schema2.items() if k != missing}
    target = tmp_path / "out" / "r.json"
    with pytest.raises(ValueError, match=missing):
        write_result(target, incomplete)
    assert not (tmp_path / "out").exists()
