"""The main job: every method head to head on the embedded SmolLM2-135M at 20% and 30%.

Run it with `tox -e demo` (or `python scripts/demo.py` in an installed environment). The
grid is resumable: results land in runs/demo/, and a second run only redoes what is
missing. It ends with the comparison table (also written to runs/demo/table.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness.api import RunSpec
from harness.grid import run_grid
from harness.manager import PluginHost
from harness.report import markdown, print_rich

# Measured on the 2-core CPU of these machines with a second job running (load ~4):
# `python scripts/demo.py --methods wanda-sp --sparsities 0.2` spent 162 s on the dense
# evaluation (done once per grid) and 236 s on the cell (prune 46 s, evaluation 144 s,
# timing 41 s). Methods with a gradient stage or iterative fitting take longer.
SECONDS_PER_CELL = 236
SECONDS_DENSE = 162


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
    overrides = {"tasks": ["arc_easy", "boolq", "piqa"], "task_limit": 20, "eval_samples": 16}
    specs = [
        RunSpec(model="smollm2-135m", method=m, sparsity=s, profile="ci", profile_overrides=overrides)
        for m in methods for s in sparsities
    ]
    done = sum(1 for _ in Path(args.results).glob("*.json")) if Path(args.results).exists() else 0
    expected = SECONDS_DENSE + SECONDS_PER_CELL * max(len(specs) - done, 0)
    print(f"prunebench demo: {len(methods)} methods x {len(sparsities)} sparsities on SmolLM2-135M "
          f"({', '.join(methods)}); expected time about {expected / 60:.0f} minutes on a 2-core CPU", flush=True)
    start = time.perf_counter()
    results = run_grid(specs, args.results, show_progress=not args.quiet, host=host)
    print_rich(results)
    table = markdown(results)
    Path(args.results, "table.md").write_text(table + "\n")
    print(f"took {(time.perf_counter() - start) / 60:.1f} minutes; markdown table: {args.results}/table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
