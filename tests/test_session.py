"""The one run path (harness.session) on tiny float64 models: a complete schema-2 result
written atomically under its cell's name; one sparsity record; a budget parameter
instead of a target (and never both); the layer loop skipped when it has nothing to do;
a saved checkpoint with its provenance that reloads to the same logits; dense metrics
cached by everything they depend on; the paper-count sparsity where it means something."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from prunebench.harness import cache as cache_mod
from prunebench.harness import runner as runner_mod
from prunebench.harness.errors import UsageError
from prunebench.harness.metrics import MetricContext
from prunebench.harness.regression import CaseProtocol, case_inputs, case_spec
from prunebench.harness.results import RESULT_SCHEMA, TOP_LEVEL_KEYS, RunResult, read_result
from prunebench.harness.session import RunSession
from prunebench.harness.spec import result_name

PROTOCOL = CaseProtocol(calibration_samples=4, calibration_seqlen=32, eval_samples=4, eval_seqlen=32)
SOURCE = "random-tokens"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test caches into its own folder (dense metrics are written even when not read)."""
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _spec(method="wanda-sp", sparsity=0.3, overrides=(), **kw):
    return dataclasses.replace(case_spec("tiny-llama-gqa", method, sparsity, PROTOCOL, overrides=tuple(overrides)), **kw)


def _session(spec, host, inputs=case_inputs) -> RunSession:
    return RunSession(spec, host=host, show_progress=False, inputs=inputs)


def _never_called(*args, **kwargs):
    raise AssertionError("inputs were built: validation should have refused the run first")


# ----- a whole run ---------------------------------------------------------------------------------
def test_a_run_returns_a_complete_schema_2_result_and_writes_it_under_its_cell_name(host, tmp_path):
    session = _session(_spec(), host)
    out = tmp_path / "results"
    result = session.run(out)
    assert isinstance(result, RunResult)
    data = result.to_dict()
    assert set(TOP_LEVEL_KEYS) <= set(data)
    assert data["schema"] == RESULT_SCHEMA == 2 and data["kind"] == "run"
    assert data["cell"] == session.cell and data["spec"]["protocol_id"] == session.protocol_id
    assert data["spec"]["protocol"] == session.protocol and data["spec"]["method"] == "wanda-sp"
    assert data["recipe"]["name"] == "wanda-sp" and set(data["recipe"]["components"]) == set(host.resolve("wanda-sp").components)
    assert len(data["metrics"]["pruned"]["ppl_windows"][SOURCE]) == PROTOCOL.eval_samples
    assert data["metrics"]["pruned"]["ppl"][SOURCE] > 0 and data["metrics"]["dense"]["ppl"][SOURCE] > 0
    assert data["timings"]["stages_s"]["total"] >= data["timings"]["stages_s"]["prune"] >= 0

    path = Path(result.path)
    assert path == session.result_path(out)
    assert path.name == result_name(session.spec, "wanda-sp", session.cell) and path.stem.endswith("__" + session.cell)
    assert sorted(p.name for p in out.iterdir()) == [path.name]  # nothing else (no temporary file) left behind
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == set(TOP_LEVEL_KEYS)
    assert on_disk == {k: data[k] for k in TOP_LEVEL_KEYS}
    assert read_result(path)["cell"] == session.cell


def test_a_run_that_fails_while_writing_leaves_no_result_file(host, tmp_path, monkeypatch):
    out = tmp_path / "results"
    real = cache_mod._fsync_file

    def fail_in_results(path):
        if Path(path).parent == out:
            raise OSError("disk full")
        real(path)

    monkeypatch.setattr(cache_mod, "_fsync_file", fail_in_results)
    with pytest.raises(OSError, match="disk full"):
        _session(_spec(), host).run(out)
    assert list(out.iterdir()) == []


def test_without_a_results_folder_nothing_is_written(host, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _session(_spec(use_cache=False), host).run()
    assert result.path is None and "path" not in result.to_dict()
    assert not list(tmp_path.glob("*.json"))


# ----- the sparsity record -------------------------------------------------------------------------
def test_the_sparsity_record_of_a_target_run(host):
    result = _session(_spec("wanda-sp", 0.3), host).run().to_dict()
    s = result["sparsity"]
    assert s["target"] == 0.3 and s["set_by"] == "target" and s["allocation_target"] == 0.3
    assert s["achieved"] == pytest.approx(0.3, abs=0.05)
    counts = result["params"]
    assert s["achieved"] == pytest.approx(1 - counts["pruned"]["decoder"] / counts["dense"]["decoder"], abs=1e-12)
    assert s["spent"]["transform"] == 0.0
    assert s["spent"]["layers"] == pytest.approx(s["achieved"], abs=1e-12)
    assert isinstance(s["paper_count"], float)  # whole heads and neurons removed: the per-unit count applies


def test_svd_llm_has_no_paper_count(host):
    s = _session(_spec("svd-llm", 0.3), host).run().to_dict()["sparsity"]
    assert s["paper_count"] is None and s["achieved"] > 0.1


# ----- a budget parameter instead of a target ------------------------------------------------------
def test_a_budget_parameter_and_a_target_together_are_refused_before_any_compute(host):
    with pytest.raises(UsageError, match=r"transform\.slicing=0\.2.*drop --sparsity"):
        _session(_spec("slicegpt", 0.3, ["transform.slicing=0.2"]), host, inputs=_never_called)


def test_a_budget_parameter_sets_the_sparsity_and_the_record_says_so(host, tmp_path):
    session = _session(_spec("slicegpt", None, ["transform.slicing=0.2"]), host)
    result = session.run(tmp_path).to_dict()
    s = result["sparsity"]
    assert s["target"] is None and s["set_by"] == "transform.slicing=0.2"
    assert s["spent"]["transform"] == pytest.approx(s["achieved"], abs=1e-12) and s["spent"]["layers"] == 0.0
    assert s["allocation_target"] == 0.0
    assert result["spec"]["method"] == "slicegpt" and result["spec"]["sparsity"] is None
    assert result["pruning"]["transform"]["slicing_requested"] == 0.2
    assert "__sset__" in Path(result["path"]).name


def test_no_target_and_no_budget_parameter_is_refused(host):
    with pytest.raises(UsageError, match="target sparsity is needed"):
        _session(_spec("wanda-sp", None), host, inputs=_never_called)
    with pytest.raises(UsageError, match="target sparsity is needed"):
        _session(_spec("slicegpt", None), host, inputs=_never_called)  # slicing left at its default (None)


# ----- the layer loop ------------------------------------------------------------------------------
def test_the_layer_loop_is_skipped_when_attention_and_ffn_are_keep(host, monkeypatch):
    def no_loop(*args, **kwargs):
        raise AssertionError("the layer loop ran")

    monkeypatch.setattr(runner_mod, "_layer_loop", no_loop)
    result = _session(_spec("slicegpt", 0.3), host).run().to_dict()
    assert result["pruning"]["layers"] == []
    assert result["sparsity"]["achieved"] > 0.1  # the transform still pruned
    with pytest.raises(AssertionError, match="the layer loop ran"):  # and the patch does stop a real loop
        _session(_spec("wanda-sp", 0.3), host).run()


# ----- saving --------------------------------------------------------------------------------------
def _saving_inputs(spec, profile, host):
    def save(model, folder):
        model.save_pretrained(folder)
        return Path(folder)

    return dataclasses.replace(case_inputs(spec, profile, host), save=save)


def test_a_saved_model_records_its_provenance_and_reloads_to_the_same_logits(host, tmp_path):
    from transformers import AutoModelForCausalLM

    import prunebench.harness.pruned_model  # noqa: F401  (registers the model type with the Auto classes)

    folder = tmp_path / "pruned"
    session = _session(_spec("wanda-sp", 0.3, save_dir=str(folder)), host, inputs=_saving_inputs)
    result = session.run().to_dict()
    assert result["spec"]["saved_to"] == str(folder)
    provenance = json.loads((folder / "config.json").read_text())["provenance"]
    assert {"method", "recipe", "target", "achieved", "protocol_id", "cell", "git_commit"} <= set(provenance)
    assert provenance["method"] == "wanda-sp" and provenance["target"] == 0.3
    assert provenance["achieved"] == pytest.approx(result["sparsity"]["achieved"])
    assert provenance["cell"] == session.cell and provenance["protocol_id"] == session.protocol_id
    assert provenance["recipe"] == host.resolve("wanda-sp").to_dict()

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = session.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_saving_with_inputs_that_cannot_save_is_refused(host, tmp_path):
    with pytest.raises(UsageError, match="cannot save"):
        _session(_spec(save_dir=str(tmp_path / "x")), host).run()
    assert not (tmp_path / "x").exists()


# ----- the dense-metric cache ----------------------------------------------------------------------
def _dense_entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "dense").glob("*.json"))


def test_dense_metrics_are_read_back_from_the_cache(host, own_cache):
    spec = _spec(use_cache=True)
    first = _session(spec, host).run().to_dict()
    entries = _dense_entries(own_cache)
    assert len(entries) == 1
    cached = json.loads(entries[0].read_text())
    assert cached["ppl"][SOURCE] == pytest.approx(first["metrics"]["dense"]["ppl"][SOURCE])
    cached["ppl"][SOURCE] = 123.0  # a value no run computes: seen again only if the cache is read
    entries[0].write_text(json.dumps(cached))

    second = _session(spec, host).run().to_dict()
    assert second["metrics"]["dense"]["ppl"][SOURCE] == 123.0
    assert second["metrics"]["pruned"]["ppl"][SOURCE] == pytest.approx(first["metrics"]["pruned"]["ppl"][SOURCE])

    not_read = _session(dataclasses.replace(spec, use_cache=False), host).run().to_dict()
    assert not_read["metrics"]["dense"]["ppl"][SOURCE] == pytest.approx(first["metrics"]["dense"]["ppl"][SOURCE])


def test_other_windows_miss_the_dense_cache(host, own_cache):
    spec = _spec(use_cache=True)
    first = _session(spec, host).run().to_dict()
    (entry,) = _dense_entries(own_cache)
    cached = json.loads(entry.read_text())
    cached["ppl"][SOURCE] = 123.0
    entry.write_text(json.dumps(cached))

    def other_windows(spec, profile, host):
        inputs = case_inputs(spec, profile, host)  # same model fingerprint, same settings, other tokens
        windows = torch.randint(0, 96, inputs.windows[SOURCE].shape, generator=torch.Generator().manual_seed(99))
        return dataclasses.replace(inputs, windows={SOURCE: windows})

    second = _session(spec, host, inputs=other_windows).run().to_dict()
    assert second["metrics"]["dense"]["ppl"][SOURCE] not in (123.0, pytest.approx(first["metrics"]["dense"]["ppl"][SOURCE]))
    assert len(_dense_entries(own_cache)) == 2


def test_the_dense_cache_key_covers_the_windows_and_the_model(host):
    session = _session(_spec(use_cache=True), host)
    metric = host.metrics["ppl"]
    windows = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))

    def ctx(win, fingerprint="tiny:a"):
        return MetricContext(phase="dense", spec=session.spec, profile=session.profile, model=None, tokenizer=None,
                             windows={SOURCE: win}, device=torch.device("cpu"), model_fingerprint=fingerprint)

    key = session._dense_cache_key(metric, ctx(windows))
    assert key == session._dense_cache_key(metric, ctx(windows.clone()))
    changed = windows.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 96
    assert key != session._dense_cache_key(metric, ctx(changed))
    assert key != session._dense_cache_key(metric, ctx(windows, fingerprint="tiny:b"))
    other_dtype = _session(_spec(use_cache=True, dtype="float32"), host)
    assert key != other_dtype._dense_cache_key(metric, ctx(windows))
