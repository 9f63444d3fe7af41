"""A compact Table 1: one row per method, one column per sparsity, "wiki / books / avg acc".

    python scripts/compact_table.py results/offline --fallback results/issue6-ablation

Cells come from result files of one protocol folder; ``--fallback`` folders fill the cells
that are missing there with runs of the same method and sparsity under another protocol
(marked with a dagger; e.g. perplexity-only runs with the same calibration and windows).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Any

from prunebench.harness.results import load_results


def cell(result: dict[str, Any], sources: tuple[str, str]) -> str:
    m = result["metrics"]["pruned"]
    acc = (m.get("zeroshot") or {}).get("average")
    ppl = " / ".join(f"{m['ppl'][s]:.2f}" for s in sources)
    return f"{ppl} / {acc:.3f}" if acc is not None else f"{ppl} / -"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--fallback", action="append", default=[])
    parser.add_argument("--sources", default="wiki-offline,books-offline")
    args = parser.parse_args()
    sources = tuple(args.sources.split(","))
    main_results = load_results([args.folder])
    table: dict[str, dict[float, str]] = defaultdict(dict)
    for r in main_results:
        table[r["spec"]["method"]][r["sparsity"]["target"]] = cell(r, sources)
    for r in load_results(args.fallback) if args.fallback else []:
        method, target = r["spec"]["method"], r["sparsity"]["target"]
        if method in table and target not in table[method] and not r["spec"].get("overrides"):
            table[method][target] = cell(r, sources) + " †"
    sparsities = sorted({s for row in table.values() for s in row})
    # Rows ordered by the mean rank of the first perplexity over the sparsities they share.
    first = {m: {s: float(v.split(" / ")[0]) for s, v in row.items()} for m, row in table.items()}
    order = sorted(table, key=lambda m: sum(sorted(first, key=lambda o: first[o].get(s, 1e30)).index(m) for s in sparsities))
    dense = main_results[0]["metrics"]["dense"]
    print("| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|" + "---|" * len(sparsities))
    dense_cell = " / ".join(f"{dense['ppl'][s]:.2f}" for s in sources) + f" / {dense['zeroshot']['average']:.3f}"
    print(f"| dense | {dense_cell} |" + " |" * (len(sparsities) - 1))
    for m in order:
        print(f"| {m} | " + " | ".join(table[m].get(s, "-") for s in sparsities) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
