"""Held-out tuning (harness.tuning): bad tune requests are refused before any compute;
candidates are the cartesian product; calibration windows come from the first part of
the calibration text only and held-out windows from its last part; a tuned run prunes
every candidate, keeps the one with the lowest held-out perplexity and records them all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import prunebench.harness.data as data_mod
from prunebench.harness import tuning
from prunebench.harness.errors import NotEnoughDataError, UsageError
from prunebench.harness.regression import CaseProtocol, case_inputs, case_spec
from prunebench.harness.session import RunInputs, RunSession
from prunebench.harness.tuning import candidates, check_tune, split_calibration

PROTOCOL = CaseProtocol(calibration_samples=4, calibration_seqlen=32, eval_samples=4, eval_seqlen=32)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))


def _spec(tune, method="wanda-sp", **kw):
    return dataclasses.replace(case_spec("tiny-llama-gqa", method, 0.3, PROTOCOL), tune=tune, **kw)


# ----- checking a tune request ---------------------------------------------------------------------
def test_a_valid_request_passes(host):
    check_tune({"ffn.multiple": [8, 16], "allocation.ffn": [0.1, 0.2, 0.3]}, host.resolve("wanda-sp"), host)
    check_tune({}, host.resolve("wanda-sp"), host)


def test_an_unknown_parameter_is_refused_naming_the_valid_ones(host):
    with pytest.raises(UsageError, match=r"ffn component 'wanda-sp' has no parameter 'nope'; valid: multiple"):
        check_tune({"ffn.nope": [1, 2]}, host.resolve("wanda-sp"), host)
    with pytest.raises(UsageError, match=r"valid: \(none\)"):
        check_tune({"attention.x": [1, 2]}, host.resolve("wanda-sp"), host)


@pytest.mark.parametrize("key", ["foo.bar", "ffn", "multiple", ".multiple"])
def test_a_key_that_is_not_kind_dot_param_is_refused(host, key):
    with pytest.raises(UsageError, match="KIND.PARAM"):
        check_tune({key: [1, 2]}, host.resolve("wanda-sp"), host)


def test_an_unknown_kind_is_refused_naming_the_valid_kinds(host):
    with pytest.raises(UsageError, match="transform, importance, allocation, attention, ffn"):
        check_tune({"foo.bar": [1, 2]}, host.resolve("wanda-sp"), host)


@pytest.mark.parametrize("values", [[8], [], 8, "8,16"])
def test_fewer_than_two_candidate_values_are_refused(host, values):
    with pytest.raises(UsageError, match="at least two candidate values"):
        check_tune({"ffn.multiple": values}, host.resolve("wanda-sp"), host)


def test_a_session_refuses_a_bad_tune_request_before_any_compute(host):
    def never(*args, **kwargs):
        raise AssertionError("inputs were built")

    with pytest.raises(UsageError, match="no parameter 'nope'"):
        RunSession(_spec({"ffn.nope": [1, 2]}), host=host, show_progress=False, inputs=never)


def test_candidates_are_the_cartesian_product():
    got = candidates({"b": [1, 2], "a": ["x", "y", "z"]})
    assert got == [{"a": a, "b": b} for a in ("x", "y", "z") for b in (1, 2)]
    assert candidates({"a": [1, 2]}) == [{"a": 1}, {"a": 2}]


# ----- splitting the calibration text --------------------------------------------------------------
N_TOKENS = 2000  # token i is the id i: a window's ids are its positions in the text


@pytest.fixture
def token_stream(monkeypatch):
    calls = []

    def fake_token_ids(tokenizer, corpus, part):
        calls.append((tokenizer, corpus, part))
        return torch.arange(N_TOKENS)

    monkeypatch.setattr(data_mod, "token_ids", fake_token_ids)
    return calls


def _inputs(text="the calibration corpus") -> RunInputs:
    return RunInputs(dense=None, tokenizer="tok", calibration=torch.zeros(1, 1, dtype=torch.long), windows={},
                     model_fingerprint="", data_fingerprints={}, cache_parts={}, calibration_text=text)


def test_calibration_comes_from_the_first_part_and_held_out_windows_from_the_last(token_stream):
    calibration, held_out = split_calibration(_inputs(), n=8, seqlen=10, seed=0)
    assert token_stream == [("tok", "the calibration corpus", "calibration")]
    cut = int(N_TOKENS * (1 - tuning.HELD_OUT_FRACTION))
    assert calibration.shape == (8, 10) and held_out.shape == (tuning.HELD_OUT_WINDOWS, 10)
    assert int(calibration.max()) < cut <= int(held_out.min())
    assert not set(calibration.flatten().tolist()) & set(held_out.flatten().tolist())
    # windows are contiguous runs of the text; held-out windows are non-overlapping, in order
    assert torch.equal(calibration - calibration[:, :1], torch.arange(10).expand(8, 10))
    assert torch.equal(held_out.flatten(), torch.arange(cut, cut + tuning.HELD_OUT_WINDOWS * 10))


def test_the_split_is_deterministic_for_a_seed(token_stream):
    first = split_calibration(_inputs(), n=8, seqlen=10, seed=3)
    again = split_calibration(_inputs(), n=8, seqlen=10, seed=3)
    other = split_calibration(_inputs(), n=8, seqlen=10, seed=4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])  # held-out text never moves


def test_too_little_text_is_refused(token_stream):
    with pytest.raises(NotEnoughDataError, match="held-out"):
        split_calibration(_inputs(), n=8, seqlen=20, seed=0)  # 16 x 20 > the last 200 tokens
    with pytest.raises(NotEnoughDataError, match="without its held-out part"):
        split_calibration(_inputs(), n=200, seqlen=12, seed=0, windows=4)


def test_inputs_without_calibration_text_cannot_be_tuned(token_stream):
    with pytest.raises(UsageError, match="calibration text"):
        split_calibration(_inputs(text=None), n=8, seqlen=10, seed=0)
    assert token_stream == []


# ----- a tuned run ---------------------------------------------------------------------------------
VALUES = [0.1, 0.5, 0.9]


@pytest.fixture
def random_split(monkeypatch):
    """Random-token calibration and held-out windows, as a tiny model has no text."""
    calls = []

    def fake_split(inputs, n, seqlen, seed, **kw):
        calls.append((n, seqlen, seed))
        gen = torch.Generator().manual_seed(100 + seed)
        return torch.randint(0, 96, (n, seqlen), generator=gen), torch.randint(0, 96, (6, seqlen), generator=gen)

    monkeypatch.setattr(tuning, "split_calibration", fake_split)
    return calls


def test_a_tuned_run_keeps_the_candidate_with_the_lowest_held_out_perplexity(host, random_split):
    session = RunSession(_spec({"allocation.ffn": VALUES}), host=host, show_progress=False, inputs=case_inputs)
    result = session.run().to_dict()
    assert random_split == [(PROTOCOL.calibration_samples, PROTOCOL.calibration_seqlen, PROTOCOL.seed)]
    record = result["tuning"]
    assert record["params"] == {"allocation.ffn": VALUES}
    assert record["held_out"]["windows"] == 6 and record["held_out"]["seqlen"] == PROTOCOL.calibration_seqlen
    assert [c["values"] for c in record["candidates"]] == [{"allocation.ffn": v} for v in VALUES]
    ppls = [c["held_out_ppl"] for c in record["candidates"]]
    assert all(isinstance(p, float) and p > 0 for p in ppls) and len(set(ppls)) == 3
    best = min(record["candidates"], key=lambda c: c["held_out_ppl"])
    assert record["chosen"] == best["values"]
    chosen = best["values"]["allocation.ffn"]
    # the session's recipe, the result and the model are the chosen candidate's
    assert session.recipe.components["allocation"].params["ffn"] == chosen
    assert result["recipe"]["components"]["allocation"]["params"]["ffn"] == chosen
    assert result["sparsity"]["achieved"] == pytest.approx(best["achieved"], abs=1e-12)
    assert result["pruning"]["allocation"]["mlp"] == [chosen, chosen]
    achieved = sorted(c["achieved"] for c in record["candidates"])
    assert achieved[0] < achieved[1] < achieved[2]  # each candidate really pruned as asked


def test_an_untuned_run_has_no_tuning_record(host, random_split):
    result = RunSession(_spec({}), host=host, show_progress=False, inputs=case_inputs).run().to_dict()
    assert result["tuning"] is None and random_split == []


def test_a_tuned_run_is_written_where_its_cell_was_planned(host, random_split, tmp_path):
    session = RunSession(_spec({"allocation.ffn": VALUES}), host=host, show_progress=False, inputs=case_inputs)
    planned = session.result_path(tmp_path)
    assert Path(session.run(tmp_path).path) == planned
