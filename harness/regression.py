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

from prunebench.harness.errors import UsageError
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
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "other-kernels-1-thread": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
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


COMMITTED = "committed"
"""The value label of the committed expectation (float64, written by ``regression --write``)."""


def measure_noise(methods: list[str], models: list[str], settings: list[str] | None = None,
                  dtypes: tuple[str, ...] = ("float64", "float32"), out: Callable[[str], Any] = print,
                  expected: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the cases under the chosen ``NOISE_ENVS`` settings and dtypes (one subprocess per
    setting: thread count and kernel path are fixed at import) and return every value.

    A float64 value is also set against the committed expectation of its case, measured by
    ``regression --write`` under the machine's default: then one extra setting (e.g. the
    other kernel path alone, the costly SmolLM2 cases) already measures a spread. float32
    runs show what float64 buys."""
    unknown = sorted(set(settings or ()) - set(NOISE_ENVS))
    if unknown:
        raise UsageError(f"unknown noise setting(s) {unknown}; choose from {sorted(NOISE_ENVS)}")
    chosen = list(settings or NOISE_ENVS)
    committed = (expected if expected is not None else load_expected()).get("cases", {})
    cases = [(m, meth) for m in models for meth in methods]
    values: dict[str, dict[str, dict[str, float]]] = {}
    for dtype in dtypes:
        per_case = values.setdefault(dtype, {})
        for name in chosen:
            start = time.perf_counter()
            runs = _cases_in_subprocess(cases, NOISE_ENVS[name], dtype)
            out(f"{dtype} {name}: {len(cases)} case(s) in {time.perf_counter() - start:.0f} s")
            for item, measured in runs.items():
                per_case.setdefault(item, {})[name] = measured["ppl"]
        if dtype == CaseProtocol().dtype:
            for item in per_case:
                if case_key(*item.split("/")) in committed:
                    per_case[item][COMMITTED] = committed[case_key(*item.split("/"))]["ppl"]
    return summarise_noise({"settings": {n: NOISE_ENVS[n] for n in chosen}, "values": values})


def summarise_noise(report: dict[str, Any]) -> dict[str, Any]:
    """Add each case's relative spread (max / min - 1 over its values) and each dtype's
    largest; ``max_relative_spread`` is float64's (the protocol's)."""
    out = {"settings": report["settings"], "values": report["values"]}
    for dtype, per_case in report["values"].items():
        spreads = {item: max(v.values()) / min(v.values()) - 1.0 for item, v in per_case.items() if len(v) > 1}
        worst = max(spreads, key=spreads.get) if spreads else None
        out[dtype] = {"relative_spread": spreads, "max_relative_spread": spreads[worst] if worst else None,
                      "worst_case": worst}
    out["max_relative_spread"] = out.get(CaseProtocol().dtype, {}).get("max_relative_spread")
    return out


def merge_noise(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Fold a new measurement into the recorded one: values per (dtype, case, setting),
    the newest winning, so settings measured on different days add up."""
    if not old or "values" not in old:
        return new
    values = {dtype: {item: dict(v) for item, v in cases.items()} for dtype, cases in old["values"].items()}
    for dtype, cases in new["values"].items():
        for item, v in cases.items():
            values.setdefault(dtype, {}).setdefault(item, {}).update(v)
    return summarise_noise({"settings": {**old.get("settings", {}), **new["settings"]}, "values": values})


def write_noise(report: dict[str, Any], command: str, path: Path = EXPECTED_PATH) -> dict[str, Any]:
    """Record a noise measurement next to the expectations it justifies (merged with any
    earlier one); returns what was written."""
    from prunebench.harness.cache import atomic_write_json

    data = load_expected(path) if path.exists() else {}
    merged = merge_noise(data.get("noise"), report)
    commands = [c for c in data.get("noise", {}).get("commands", []) if c != command] + [command]
    data["noise"] = {**merged, "commands": commands, "machine": platform.processor() or platform.machine(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    atomic_write_json(path, data)
    return data["noise"]


def noise_table(noise: dict[str, Any], models: tuple[str, ...] | None = None) -> str:
    """The recorded noise as a markdown table: one row per case, per dtype the values under
    each setting and the relative spread (max / min - 1)."""
    dtypes = [d for d in ("float64", "float32") if d in noise.get("values", {})]
    recorded = noise.get("settings", {})
    settings = [COMMITTED, *[n for n in NOISE_ENVS if n in recorded], *[n for n in recorded if n not in NOISE_ENVS]]
    cases = sorted({item for d in dtypes for item in noise["values"][d]}
                   if models is None else {item for d in dtypes for item in noise["values"][d] if item.split("/")[0] in models})
    columns = [(d, name) for d in dtypes for name in settings if any(name in noise["values"][d].get(c, {}) for c in cases)]
    header = ["case", *[f"{d} {name}" for d, name in columns], *[f"{d} spread" for d in dtypes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        values = [noise["values"][d].get(case, {}).get(name) for d, name in columns]
        spreads = [noise.get(d, {}).get("relative_spread", {}).get(case) for d in dtypes]
        row = [case, *["-" if v is None else f"{v:.4f}" for v in values], *["-" if x is None else f"{x:.1e}" for x in spreads]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

