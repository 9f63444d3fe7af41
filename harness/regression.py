"""Quality regression cases: every method, pruned small and fast, against committed perplexities.

A case prunes one model with one method at 30% on a fixed small calibration set and
measures perplexity on fixed windows, through the one run path (``harness.session``).
The committed expectations (``results/regression/expected.json``, written by
``prunebench regression --write``) turn any change that makes a method worse into a
failing test, on any x86-64 CPU and thread count.

Why float64: in float32 the rounding of matrix products depends on the thread count and
on the CPU's kernels (AVX2, AVX-512, AMX), and pruning turns a rounding difference into a
different discrete choice (a head, a channel): the same float32 case moved 3-6% between
machines and thread counts, more than a regression tolerance can allow. The cases run in
float64 end to end (model, statistics, gradients, decompositions), where those rounding
differences are ~1e-16 and flip no choice: measured spreads are in ``expected.json``
(``noise``) and in results/README.md. The tolerance (2%) is then far above the float
noise and far below the 5% regression the cases must catch (``tests/test_regression.py``
checks both, with a deliberately degraded method).

The cases cover the embedded SmolLM2-135M (real text: the sensitive check) and tiny
random GQA / MHA Llama and Phi-3 models (the architectures' code paths, random tokens).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prunebench.harness.manager import PluginHost
from prunebench.harness.profiles import Profile
from prunebench.harness.session import RunInputs, RunSession
from prunebench.harness.spec import RunSpec

EXPECTED_PATH = Path(__file__).resolve().parent.parent / "results" / "regression" / "expected.json"
TOLERANCE = 0.02
"""Relative: a 5% worse perplexity fails; float noise (float64: ~1e-9 measured) does not."""
REAL_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama-gqa", "tiny-llama-mha", "tiny-phi3")
SPARSITY = 0.3
RANDOM_SOURCE = "random-tokens"


@dataclass(frozen=True)
class CaseProtocol:
    """The fixed sizes of a regression case (small enough for CI, large enough to rank methods)."""

    calibration_samples: int = 4
    calibration_seqlen: int = 128
    eval_samples: int = 4
    eval_seqlen: int = 128
    seed: int = 0
    dtype: str = "float64"


def case_spec(model: str, method: str, sparsity: float = SPARSITY, protocol: CaseProtocol = CaseProtocol(),
              overrides: tuple[str, ...] = ()) -> RunSpec:
    source = RANDOM_SOURCE if model in TINY_MODELS else "wiki-offline"
    return RunSpec(
        model=model, method=method, sparsity=sparsity, overrides=list(overrides), profile="ci",
        profile_overrides={"calibration_source": source, "calibration_samples": protocol.calibration_samples,
                           "calibration_seqlen": protocol.calibration_seqlen, "eval_sources": [source],
                           "eval_samples": protocol.eval_samples, "eval_seqlen": protocol.eval_seqlen, "batch_size": 4},
        seed=protocol.seed, dtype=protocol.dtype, zeroshot=False, timing=False, metrics=["ppl"], use_cache=False,
    )


def case_inputs(spec: RunSpec, profile: Profile, host: PluginHost | None = None) -> RunInputs:
    """The model and data of a case, in the case's dtype (random tokens for a tiny model)."""
    dtype = getattr(torch, spec.dtype)
    if spec.model in TINY_MODELS:
        from prunebench.harness.testing import tiny_model

        source = tiny_model(spec.model.removeprefix("tiny-"), seed=spec.seed)
        gen = torch.Generator().manual_seed(spec.seed)
        vocab = source.config.vocab_size
        calibration = torch.randint(0, vocab, (profile.calibration_samples, profile.calibration_seqlen), generator=gen)
        windows = torch.randint(0, vocab, (profile.eval_samples, profile.eval_seqlen), generator=gen)
        fingerprint = f"tiny:{spec.model}:{spec.seed}"
        tokenizer = None
    else:
        from prunebench.harness.data import calibration_batch, evaluation_windows, load_corpus
        from prunebench.harness.models import load_source_model

        loaded = load_source_model(spec.model)
        source, tokenizer, fingerprint = loaded.model, loaded.tokenizer, loaded.fingerprint
        max_pos = source.config.max_position_embeddings
        corpus = load_corpus(profile.calibration_source)
        calibration = calibration_batch(tokenizer, corpus, profile.calibration_samples, profile.calibration_seqlen,
                                        spec.seed, max_pos)
        windows = evaluation_windows(tokenizer, load_corpus(profile.eval_sources[0]), profile.eval_samples,
                                     profile.eval_seqlen, max_pos)
    return RunInputs.from_model(source.to(dtype), calibration, {profile.eval_sources[0]: windows}, fingerprint,
                                tokenizer=tokenizer, host=host)


def run_case(model: str, method: str, sparsity: float = SPARSITY, protocol: CaseProtocol = CaseProtocol(),
             host: PluginHost | None = None, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """Prune and measure one case: dense and pruned perplexity, achieved sparsity."""
    spec = case_spec(model, method, sparsity, protocol, overrides)
    result = RunSession(spec, host=host, show_progress=False, inputs=case_inputs).run().to_dict()
    source = spec.profile_overrides["eval_sources"][0]
    return {"dense_ppl": result["metrics"]["dense"]["ppl"][source], "ppl": result["metrics"]["pruned"]["ppl"][source],
            "achieved": result["sparsity"]["achieved"]}


def case_key(model_name: str, method: str, sparsity: float = SPARSITY) -> str:
    return f"{model_name}/{method}/s{sparsity:.2f}"


def case_models() -> tuple[str, ...]:
    return (REAL_MODEL, *TINY_MODELS)


def case_methods(host: PluginHost) -> list[str]:
    """Every method compared head to head (ablation rows are not regression cases)."""
    return sorted(name for name, r in host.recipes.items() if r.role == "method")


def load_expected(path: Path = EXPECTED_PATH) -> dict[str, Any]:
    return json.loads(path.read_text())


def check(measured: float, expected: float, tolerance: float = TOLERANCE) -> str | None:
    """None when ``measured`` is within ``tolerance`` of ``expected``; otherwise why not."""
    change = measured / expected - 1.0
    if abs(change) <= tolerance:
        return None
    direction = "worse" if change > 0 else "better"
    return (f"perplexity {measured:.4f} vs expected {expected:.4f} ({100 * change:+.1f}%, {direction} than "
            f"the committed result, tolerance {100 * tolerance:.0f}%); if intended, rerun "
            f"`prunebench regression --write` and commit results/regression/expected.json with the reason")


def run_cases(methods: list[str] | None = None, models: list[str] | None = None, write: bool = False,
              out: Callable[[str], Any] = print, host: PluginHost | None = None) -> int:
    """Run the cases, print one line each, optionally record them; returns how many failed."""
    from prunebench.harness.cache import atomic_write_json

    host = host or PluginHost()
    chosen = methods or case_methods(host)
    expected_file = load_expected() if EXPECTED_PATH.exists() else {}
    expected = expected_file.get("cases", {})
    cases: dict[str, dict[str, float]] = {}
    failed = 0
    for model in models or case_models():
        for method in chosen:
            start = time.perf_counter()
            measured = run_case(model, method, host=host)
            measured["seconds"] = round(time.perf_counter() - start, 1)
            key = case_key(model, method)
            cases[key] = measured
            old = expected.get(key, {}).get("ppl")
            verdict = "new" if old is None else (check(measured["ppl"], old) or "ok")
            failed += verdict not in ("ok", "new")
            out(f"{key:44s} dense {measured['dense_ppl']:9.3f}  pruned {measured['ppl']:9.3f}  achieved "
                f"{measured['achieved']:.3f}  {measured['seconds']:5.1f} s  {verdict}")
    if write:
        atomic_write_json(EXPECTED_PATH, {
            **{k: v for k, v in expected_file.items() if k not in ("cases",)},
            "command": "prunebench regression --write", "tolerance": TOLERANCE, "sparsity": SPARSITY,
            "protocol": asdict(CaseProtocol()), "torch": torch.__version__, "machine": platform.machine(),
            "cases": {**expected, **cases},
        })
        out(f"wrote {EXPECTED_PATH}")
    return failed


NOISE_ENVS: dict[str, dict[str, str]] = {
    "default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "other kernel path, 1 thread": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
"""Settings the same cases run under to measure how much float rounding moves them: the
machine's default (all cores, its best kernels), one thread, and an older CPU emulated on
this one (scalar ATen kernels, MKL's SSE4.2 path)."""


def _cases_in_subprocess(cases: list[tuple[str, str]], env: dict[str, str], dtype: str) -> dict[str, dict[str, float]]:
    import os
    import subprocess
    import sys

    probe = ("import json, sys\n"
             "from prunebench.harness.regression import CaseProtocol, run_case\n"
             "out = {}\n"
             "for item in sys.argv[2:]:\n"
             "    model, method = item.split('/')\n"
             "    out[item] = run_case(model, method, protocol=CaseProtocol(dtype=sys.argv[1]))\n"
             "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", probe, dtype, *(f"{m}/{meth}" for m, meth in cases)],
                          env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_noise(methods: list[str], models: list[str], out: Callable[[str], Any] = print) -> dict[str, Any]:
    """Run the cases under every ``NOISE_ENVS`` setting, in float64 (the protocol) and in
    float32 (to show what float64 buys), and report the largest relative spread of each."""
    cases = [(m, meth) for m in models for meth in methods]
    report: dict[str, Any] = {"settings": NOISE_ENVS, "cases": [f"{m}/{meth}" for m, meth in cases]}
    for dtype in ("float64", "float32"):
        runs = {}
        for name, env in NOISE_ENVS.items():
            start = time.perf_counter()
            runs[name] = _cases_in_subprocess(cases, env, dtype)
            out(f"{dtype} {name}: {time.perf_counter() - start:.0f} s")
        spread = {}
        for item in report["cases"]:
            values = [runs[name][item]["ppl"] for name in NOISE_ENVS]
            spread[item] = {"values": dict(zip(NOISE_ENVS, values)), "relative_spread": max(values) / min(values) - 1.0}
        worst = max(spread.values(), key=lambda v: v["relative_spread"])
        report[dtype] = {"per_case": spread, "max_relative_spread": worst["relative_spread"]}
        out(f"{dtype}: largest relative spread {worst['relative_spread']:.2e}")
    report["max_relative_spread"] = report["float64"]["max_relative_spread"]
    return report


def write_noise(report: dict[str, Any], path: Path = EXPECTED_PATH) -> None:
    """Record a noise measurement next to the expectations it justifies."""
    from prunebench.harness.cache import atomic_write_json

    data = load_expected(path) if path.exists() else {}
    data["noise"] = {**report, "command": "prunebench regression --noise", "machine": platform.processor() or platform.machine()}
    atomic_write_json(path, data)
