"""The main job: every method head to head on the embedded SmolLM2-135M at 20% and 30%.

Run it with `tox -e demo` (or `python scripts/demo.py` in an installed environment). The
grid is resumable: results land in runs/demo/, and a second run only redoes what is
missing. It ends with the comparison table (also written to runs/demo/table.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from prunebench.harness.api import RunSpec
from prunebench.harness.cache import atomic_write_bytes
from prunebench.harness.grid import run_grid
from prunebench.harness.manager import PluginHost
from prunebench.harness.report import markdown, print_rich

# Seconds per grid cell (load, prune, evaluation, timing; mean of 20% and 30%; flap without
# the dense evaluation its first cell carried) and for the
# dense evaluation plus the one-time model conversion, measured by the full demo on the
# 2-core CPU of these machines while a 1-thread pruning job shared it (21.8 minutes in
# all; results/demo/). The start-up estimate sums them for the cells without a result.
SECONDS_PER_CELL: dict[str, float] = {
    "flap": 60, "intraslice": 122, "olica": 80, "slicegpt": 68, "sobp-exact": 94, "svd-llm": 110, "wanda-sp": 52,
}
DEFAULT_SECONDS_PER_CELL = 100.0  # a method added since the measurement
SECONDS_DENSE = 60.0

# The demo's protocol: the ci profile with fewer perplexity windows and three short
# zero-shot tasks, so every method at two sparsities fits in 30 minutes on 2 cores.
DEMO_OVERRIDES = {"tasks": ["arc_easy", "piqa", "winogrande"], "task_limit": 20, "eval_samples": 8}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.2,0.3")
    parser.add_argument("--methods", help="comma-separated; default: every method (not ablation rows)")
    parser.add_argument("--results", default="runs/demo")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    host = PluginHost()
    methods = args.methods.split(",") if args.methods else sorted(
        name for name, r in host.recipes.items() if r.role == "method"
    )
    sparsities = [float(s) for s in args.sparsities.split(",")]
    specs = [
        RunSpec(model="smollm2-135m", method=m, sparsity=s, profile="ci", profile_overrides=dict(DEMO_OVERRIDES))
        for m in methods for s in sparsities
    ]
    missing = [spec for spec in specs if not _result_exists(spec, args.results, host)]
    expected = (SECONDS_DENSE if missing else 0) + sum(
        SECONDS_PER_CELL.get(spec.method, DEFAULT_SECONDS_PER_CELL) for spec in missing)
    print(f"prunebench demo: {len(methods)} methods x {len(sparsities)} sparsities on SmolLM2-135M "
          f"({', '.join(methods)}); expected time about {expected / 60:.0f} minutes on a 2-core CPU", flush=True)
    start = time.perf_counter()
    results = run_grid(specs, args.results, show_progress=not args.quiet, host=host)
    print_rich(results)
    table = markdown(results)
    atomic_write_bytes(Path(args.results, "table.md"), (table + "\n").encode())
    per_method: dict[str, list[float]] = {}
    for r in results:
        per_method.setdefault(r["recipe"]["name"], []).append(r["timings"]["stages_s"]["total"])
    print("seconds per cell: " + ", ".join(f"{m} {sum(t) / len(t):.0f}" for m, t in sorted(per_method.items())))
    print(f"took {(time.perf_counter() - start) / 60:.1f} minutes; markdown table: {args.results}/table.md")
    return 0


def _result_exists(spec: RunSpec, results_dir: str, host: PluginHost) -> bool:
    from prunebench.harness.grid import existing_cells
    from prunebench.harness.session import RunSession

    return RunSession(spec, host=host, show_progress=False).cell in existing_cells(results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
