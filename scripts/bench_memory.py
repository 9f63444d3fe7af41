"""Benchmark: peak memory (RSS) of pruning SmolLM2-135M with 64 x 512 calibration tokens.

Run in a fresh process per method so each peak is its own (`ru_maxrss` is per process).
Prints the peak against the budget (3 GiB by default) and against the model's float32
weight size. ``--stage importance`` runs only the method's importance stage (for
mask-gradient importance: the backward pass, whose budget is 6 GiB), uncached.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1024**3


def measure(method: str, samples: int, seqlen: int, stage: str = "prune") -> dict:
    """One method's peak RSS through the one run path (``RunSession``; no evaluation)."""
    from prunebench.harness.session import RunSession, load_inputs
    from prunebench.harness.spec import RunSpec

    spec = RunSpec(method=method, sparsity=0.3, profile="offline", metrics=[], zeroshot=False, timing=False,
                   profile_overrides={"calibration_samples": samples, "calibration_seqlen": seqlen}, use_cache=False)
    session = RunSession(spec, show_progress=False)
    inputs = load_inputs(spec, session.profile, session.host)
    weight_bytes = sum(p.numel() * p.element_size() for p in inputs.source_model.parameters())
    inputs.source_model = None  # only the harness-format copy is pruned
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if stage == "importance":
        session.host.call("importance", session.recipe.components["importance"], run=session.run_context(inputs, inputs.dense))
    else:
        session.prune(inputs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "peak_rss_gib": peak / GIB, "rss_before_prune_gib": base / GIB,
            "model_fp32_gib": weight_bytes / GIB, "prune_s": time.perf_counter() - start,
            "calibration": f"{samples}x{seqlen}", "stage": stage}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="wanda-sp")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--budget-gib", type=float, default=3.0)
    parser.add_argument("--stage", choices=("prune", "importance"), default="prune",
                        help="measure the whole pruning, or only the importance (gradient) stage")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.samples, args.seqlen, args.stage)))
        return 0
    failed = False
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", method, "--samples", str(args.samples),
                              "--seqlen", str(args.seqlen), "--stage", args.stage],
                             check=False, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ok = r["peak_rss_gib"] < args.budget_gib
        failed |= not ok
        print(f"{method:>12}: peak RSS {r['peak_rss_gib']:.2f} GiB (budget {args.budget_gib} GiB, "
              f"{'ok' if ok else 'OVER'}); before pruning {r['rss_before_prune_gib']:.2f} GiB; "
              f"model fp32 {r['model_fp32_gib']:.2f} GiB; {r['stage']} {r['prune_s']:.0f} s; calibration {r['calibration']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
