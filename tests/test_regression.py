"""Quality regression: every method on SmolLM2 and on tiny GQA Llama / Phi-3 models gives
the committed perplexity within the tolerance, so a change that makes a method worse fails."""

from __future__ import annotations

import pytest

from prunebench.harness.manager import PluginHost
from prunebench.harness.regression import (
    REAL_MODEL,
    SPARSITY,
    TINY_MODELS,
    TOLERANCE,
    case_key,
    check,
    load_expected,
    methods,
    run_case,
)

EXPECTED = load_expected()
HOST = PluginHost()
CASES = [(model, method) for model in (REAL_MODEL, *TINY_MODELS) for method in methods(HOST)]


def test_every_method_and_model_has_a_committed_expectation():
    missing = [case_key(m, meth, SPARSITY) for m, meth in CASES if case_key(m, meth, SPARSITY) not in EXPECTED["cases"]]
    assert not missing, f"no expected perplexity for {missing}: run `python scripts/regression.py --write`"


def test_the_tolerance_catches_a_five_percent_regression():
    assert TOLERANCE < 0.05
    assert check(105.0, 100.0) is not None and check(95.0, 100.0) is not None
    assert check(100.0 * (1 + TOLERANCE / 2), 100.0) is None


@pytest.mark.parametrize("model, method", [
    pytest.param(m, meth, id=f"{m}-{meth}", marks=[pytest.mark.real] if m == REAL_MODEL else []) for m, meth in CASES
])
def test_perplexity_matches_the_committed_result(model, method):
    expected = EXPECTED["cases"][case_key(model, method, SPARSITY)]
    measured = run_case(model, method, host=HOST)
    assert measured["dense_ppl"] == pytest.approx(expected["dense_ppl"], rel=1e-4)
    assert measured["achieved"] == pytest.approx(expected["achieved"], abs=1e-6)  # same plan sizes
    problem = check(measured["ppl"], expected["ppl"])
    assert problem is None, f"{case_key(model, method, SPARSITY)}: {problem}"
