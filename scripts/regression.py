"""Run the quality regression cases; ``--write`` records them as the committed expectations.

Every method at 30% on SmolLM2-135M (4 x 128 calibration tokens, 4 x 128 evaluation
tokens of wiki-offline) and on tiny random GQA Llama and Phi-3 models. The test
``tests/test_regression.py`` reruns the cases and fails when a perplexity moves by more
than the tolerance (``prunebench.harness.regression.TOLERANCE``).
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict

import torch

from prunebench.harness.cache import atomic_write_json
from prunebench.harness.manager import PluginHost
from prunebench.harness.regression import (
    EXPECTED_PATH,
    REAL_MODEL,
    SPARSITY,
    TINY_MODELS,
    TOLERANCE,
    Protocol,
    case_key,
    check,
    load_expected,
    methods,
    run_case,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the measured perplexities as expected")
    parser.add_argument("--methods", help="comma-separated (default: every method)")
    args = parser.parse_args()
    host = PluginHost()
    chosen = args.methods.split(",") if args.methods else methods(host)
    expected = load_expected()["cases"] if EXPECTED_PATH.exists() else {}
    cases: dict[str, dict[str, float]] = {}
    failed = 0
    for model in (REAL_MODEL, *TINY_MODELS):
        for method in chosen:
            start = time.perf_counter()
            out = run_case(model, method, host=host)
            out["seconds"] = round(time.perf_counter() - start, 1)
            key = case_key(model, method, SPARSITY)
            cases[key] = out
            old = expected.get(key, {}).get("ppl")
            verdict = "new" if old is None else (check(out["ppl"], old) or "ok")
            failed += verdict not in ("ok", "new")
            print(f"{key:40s} dense {out['dense_ppl']:9.3f}  pruned {out['ppl']:9.3f}  achieved "
                  f"{out['achieved']:.3f}  {out['seconds']:5.1f} s  {verdict}", flush=True)
    if args.write:
        atomic_write_json(EXPECTED_PATH, {
            "command": "python scripts/regression.py --write", "tolerance": TOLERANCE, "sparsity": SPARSITY,
            "protocol": asdict(Protocol()), "torch": torch.__version__, "machine": platform.machine(),
            "cases": {**expected, **cases},
        })
        print(f"wrote {EXPECTED_PATH}")
    return 1 if failed and not args.write else 0


if __name__ == "__main__":
    raise SystemExit(main())
