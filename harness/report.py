"""Tables and plots from result files.

Results are grouped by protocol (``spec.protocol_id``): runs under different calibration,
evaluation or timing settings are never put in one table; each group gets its own,
headed by what differs. Rows follow the paper's Table 1: one per method and sparsity,
dense first.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tabulate import tabulate

TASK_ORDER = ("arc_challenge", "arc_easy", "winogrande", "boolq", "hellaswag", "openbookqa", "piqa")
TASK_SHORT = {"arc_challenge": "ARC-c", "arc_easy": "ARC-e", "winogrande": "WinoG", "boolq": "BoolQ",
              "hellaswag": "HellaS", "openbookqa": "OBQA", "piqa": "PIQA"}


def group_by_protocol(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["spec"].get("protocol_id", "?")].append(r)
    return dict(groups)


def describe_protocol(result: dict[str, Any]) -> str:
    p = result["spec"]["protocol"]
    prof = p["profile"]
    return (f"model {p['model']} ({p['dtype']}), profile {prof['name']}: calibration {prof['calibration_samples']}x"
            f"{prof['calibration_seqlen']} {prof['calibration_source']}, perplexity {prof['eval_samples']}x"
            f"{prof['eval_seqlen']}, zero-shot limit {prof['task_limit']}, seed {p['seed']}")


def _zeroshot_cells(metrics: dict[str, Any]) -> tuple[list[Any], Any]:
    zs = metrics.get("zeroshot")
    if not zs:
        return [None] * len(TASK_ORDER), None
    scores = zs.get("scores", {})
    return [scores.get(t) for t in TASK_ORDER], zs.get("average")


def _ratio(result: dict[str, Any], key: str) -> Any:
    """A timing ratio to dense: whole-model keys, or ``layer_*`` keys of the layer timing."""
    inf = (result.get("timings") or {}).get("inference") or {}
    ratios = ((inf.get("layer") or {}).get("ratios") if key.startswith("layer_") else inf.get("ratios")) or {}
    return ratios.get(key)


def rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of one protocol group: dense once, then method x sparsity."""
    sources = sorted({s for r in results for s in r["metrics"]["pruned"].get("ppl", {})})
    header = ["method", "sparsity", "achieved", *[f"PPL {s}" for s in sources],
              *[TASK_SHORT[t] for t in TASK_ORDER], "avg acc", "prefill x", "decode x", "layer prefill x", "layer decode x", "prune s"]
    out: list[list[Any]] = []
    if results:
        dense = results[0]["metrics"]["dense"]
        tasks, avg = _zeroshot_cells(dense)
        out.append(["dense", 0.0, 0.0, *[dense["ppl"].get(s) for s in sources], *tasks, avg, 1.0, 1.0, 1.0, 1.0, None])
    for r in sorted(results, key=lambda r: (r["sparsity"]["target"], r["recipe"]["name"])):
        m = r["metrics"]["pruned"]
        tasks, avg = _zeroshot_cells(m)
        out.append([r["recipe"]["name"], r["sparsity"]["target"], r["sparsity"]["achieved"],
                    *[m["ppl"].get(s) for s in sources], *tasks, avg,
                    _ratio(r, "prefill_speedup"), _ratio(r, "decode_speedup"),
                    _ratio(r, "layer_prefill_speedup"), _ratio(r, "layer_decode_speedup"),
                    r["timings"]["stages_s"].get("prune")])
    return header, out


def format_cell(value: Any) -> str:
    """A table cell: 3 decimals below 10, 2 above, "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def markdown(results: list[dict[str, Any]]) -> str:
    parts = []
    for pid, group in group_by_protocol(results).items():
        header, body = rows(group)
        parts.append(f"Protocol `{pid}`: {describe_protocol(group[0])}\n")
        parts.append(tabulate([[format_cell(c) for c in row] for row in body], headers=header, tablefmt="github"))
        parts.append("")
    return "\n".join(parts)


def cost_rows(results: list[dict[str, Any]], reference: str = "slicegpt") -> tuple[list[str], list[list[Any]]]:
    """Pruning cost per method and sparsity (the paper's Table 7): wall time of the pruning
    stages, its ratio to ``reference``'s time at the same sparsity and protocol, and the
    peak RSS after pruning. Timings are only comparable within one machine and load."""
    header = ["method", "sparsity", "prune s", f"x {reference}", "importance s", "layer loop s", "peak RSS GiB"]
    ref_time = {
        (r["spec"].get("protocol_id"), r["sparsity"]["target"]): r["timings"]["stages_s"].get("prune")
        for r in results if r["recipe"]["name"] == reference
    }
    out = []
    for r in sorted(results, key=lambda r: (r["sparsity"]["target"], r["recipe"]["name"])):
        stages = r["timings"]["stages_s"]
        base = ref_time.get((r["spec"].get("protocol_id"), r["sparsity"]["target"]))
        prune_s = stages.get("prune")
        memory = r.get("memory") or {}
        peak = memory.get("peak_rss_after_prune_mb", memory.get("peak_rss_mb"))
        out.append([r["recipe"]["name"], r["sparsity"]["target"], prune_s,
                    prune_s / base if base and prune_s is not None else None,
                    stages.get("prune.importance"), stages.get("prune.layer_loop"),
                    peak / 1024.0 if peak is not None else None])
    return header, out


def cost_markdown(results: list[dict[str, Any]], reference: str = "slicegpt") -> str:
    header, body = cost_rows(results, reference)
    return tabulate([[format_cell(c) for c in row] for row in body], headers=header, tablefmt="github")


def field_value(result: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a result (``spec.protocol.profile.calibration_samples``,
    ``recipe.components.allocation.params.lambda_b``); KeyError names the missing part."""
    value: Any = result
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"result has no {path!r} (no {part!r})")
        value = value[part]
    return value


def _has_field(result: dict[str, Any], path: str) -> bool:
    try:
        field_value(result, path)
    except KeyError:
        return False
    return True


def sweep_rows(results: list[dict[str, Any]], key: str) -> tuple[list[str], list[list[Any]]]:
    """One row per result, ordered by method, sparsity and the swept value: a sweep varies
    one setting (a component parameter, the calibration size) across runs that may belong
    to different protocols, so unlike ``rows`` this table spans protocol groups. Results
    without the field (e.g. a recipe whose allocation has no such parameter) are left out."""
    sources = sorted({s for r in results for s in r["metrics"]["pruned"].get("ppl", {})})
    label = key.rsplit(".", 1)[-1]
    header = ["method", "sparsity", label, "achieved", *[f"PPL {s}" for s in sources], "avg acc", "prune s"]
    out = []
    having = [r for r in results if _has_field(r, key)]
    if not having:
        field_value(results[0], key)  # raises KeyError naming the missing part
    for r in having:
        m = r["metrics"]["pruned"]
        out.append([r["spec"].get("method", r["recipe"]["name"]), r["sparsity"]["target"], field_value(r, key),
                    r["sparsity"]["achieved"], *[m["ppl"].get(s) for s in sources],
                    (m.get("zeroshot") or {}).get("average"), r["timings"]["stages_s"].get("prune")])
    out.sort(key=lambda row: (str(row[0]), row[1], row[2]))
    return header, out


def sweep_markdown(results: list[dict[str, Any]], key: str) -> str:
    header, body = sweep_rows(results, key)
    table = tabulate([[format_cell(c) for c in row] for row in body], headers=header, tablefmt="github")
    left_out = len(results) - len(body)
    return table + (f"\n\n({left_out} result(s) without `{key}` left out)" if left_out else "")


def sweep_plot(results: list[dict[str, Any]], key: str, path: str | Path) -> Path:
    """Perplexity per evaluation source against the swept value, one line per method and sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, body = sweep_rows(results, key)
    ppl_columns = [i for i, h in enumerate(header) if h.startswith("PPL ")]
    fig, axes = plt.subplots(1, len(ppl_columns), figsize=(4.2 * len(ppl_columns), 3.4), squeeze=False)
    for ax, col in zip(axes[0], ppl_columns):
        for method, sparsity in sorted({(row[0], row[1]) for row in body}):
            pts = [(row[2], row[col]) for row in body if (row[0], row[1]) == (method, sparsity) and row[col] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} @{sparsity:g}")
        ax.set_xlabel(header[2])
        ax.set_ylabel(header[col])
        ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, Path(path))


def print_rich(results: list[dict[str, Any]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    # A log file or CI has no terminal width; the Table-1 layout needs ~200 columns.
    console = Console(width=None if sys.stdout.isatty() else 220)
    for pid, group in group_by_protocol(results).items():
        header, body = rows(group)
        table = Table(title=f"protocol {pid}", caption=describe_protocol(group[0]))
        for h in header:
            table.add_column(h, justify="left" if h == "method" else "right")
        for row in body:
            table.add_row(*[format_cell(c) for c in row])
        console.print(table)


def plots(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Three PNGs per protocol group: perplexity vs sparsity, accuracy vs latency ratio
    (a Pareto view), pruning time per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for pid, group in group_by_protocol(results).items():
        by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            by_method[r["recipe"]["name"]].append(r)
        source = sorted(group[0]["metrics"]["pruned"].get("ppl", {}) or ["?"])[0]
        dense_ppl = group[0]["metrics"]["dense"]["ppl"].get(source)

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, runs in sorted(by_method.items()):
            runs = sorted(runs, key=lambda r: r["sparsity"]["target"])
            ax.plot([r["sparsity"]["achieved"] for r in runs], [r["metrics"]["pruned"]["ppl"].get(source) for r in runs],
                    marker="o", label=name)
        if dense_ppl:
            ax.axhline(dense_ppl, color="gray", linestyle="--", label="dense")
        ax.set_xlabel("achieved decoder sparsity")
        ax.set_ylabel(f"perplexity ({source})")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("Perplexity vs sparsity")
        written.append(_save(fig, out / f"ppl_vs_sparsity_{pid}.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, runs in sorted(by_method.items()):
            pts = [(_ratio(r, "prefill_latency_ratio"), (r["metrics"]["pruned"].get("zeroshot") or {}).get("average"))
                   for r in runs]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if pts:
                ax.scatter(*zip(*pts), label=name)
        dense_avg = (group[0]["metrics"]["dense"].get("zeroshot") or {}).get("average")
        if dense_avg is not None:
            ax.scatter([1.0], [dense_avg], marker="*", s=120, color="black", label="dense")
        ax.set_xlabel("prefill latency / dense")
        ax.set_ylabel("average zero-shot accuracy")
        ax.legend(fontsize=7)
        ax.set_title("Accuracy vs latency")
        written.append(_save(fig, out / f"accuracy_vs_latency_{pid}.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        names = sorted(by_method)
        times = [sum(r["timings"]["stages_s"].get("prune", 0.0) for r in by_method[n]) / len(by_method[n]) for n in names]
        ax.barh(names, times)
        ax.set_xlabel("pruning wall time per run (s)")
        ax.set_title("Pruning cost")
        written.append(_save(fig, out / f"pruning_time_{pid}.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
