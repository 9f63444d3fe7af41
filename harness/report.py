"""Tables, verdicts and plots from result files.

Results are grouped by protocol (``spec.protocol_id``): runs under different calibration,
evaluation or timing settings never share a table; each group gets its own, headed by
what it was measured under. Within a protocol, the runs of one recipe at one sparsity
over several calibration seeds are one cell (``harness.verdicts``): its headline numbers
are shown with their 95% interval, ranks count only significant wins, and every pair of
methods at a sparsity gets a stated verdict. Columns come from the registered metrics
(``harness.metrics``), so a plugin metric shows up without touching this module.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from tabulate import tabulate

from prunebench.harness.metrics import Measure, Metric
from prunebench.harness.verdicts import TEST_STDERR, TEST_UNITS, Cell, CellStat, Verdict, cell_stats, group_cells, pairwise, ranks


def _metrics() -> list[Metric]:
    from prunebench.harness.manager import default_host

    return list(default_host().metrics.values())


def group_by_protocol(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["spec"].get("protocol_id", "?")].append(r)
    return dict(groups)


def describe_protocol(result: dict[str, Any]) -> str:
    """One line: model, calibration and what each metric was measured on."""
    p = result["spec"]["protocol"]
    cal = p["calibration"]
    parts = [f"model {p['model']} ({p['dtype']}, {p.get('device_type', 'cpu')})",
             f"calibration {cal['samples']}x{cal['seqlen']} {cal['source']}"]
    metrics = p.get("metrics") or {}
    if "ppl" in metrics:
        ppl = metrics["ppl"]
        samples = "all" if ppl.get("samples") is None else ppl["samples"]
        parts.append(f"perplexity {samples}x{ppl.get('seqlen')} windows per corpus")
    if "zeroshot" in metrics:
        zs = metrics["zeroshot"]
        parts.append(f"zero-shot {len(zs.get('tasks') or [])} tasks, limit {zs.get('limit') if zs.get('limit') else 'all'}")
    if "timing" in metrics:
        parts.append(f"timing at {metrics['timing'].get('seqlen')} tokens")
    return ", ".join(parts)


def measures_of(result: dict[str, Any], phase: str = "pruned", metrics: list[Metric] | None = None) -> list[Measure]:
    """Every registered metric's measures of one phase of a result, in registration order."""
    block = (result.get("metrics") or {}).get(phase) or {}
    out: list[Measure] = []
    for metric in metrics if metrics is not None else _metrics():
        out.extend(metric.measures(block, result))
    return out


def unknown_metric_keys(results: list[dict[str, Any]]) -> list[str]:
    """Result metric keys no registered metric owns (a plugin not installed here)."""
    owned = {k for m in _metrics() for k in m.keys}
    return sorted({k for r in results for block in (r.get("metrics") or {}).values() for k in block} - owned)


def format_cell(value: Any) -> str:
    """A table cell: 3 decimals below 10, 2 above, "-" for a missing value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def _with_interval(stat: CellStat | None, fallback: Measure | None) -> str:
    if stat is None:
        return format_cell(fallback.value if fallback else None) + (" *" if fallback is not None and fallback.flag else "")
    text = format_cell(stat.mean)
    if stat.low is not None and stat.high is not None:
        text += f" [{format_cell(stat.low)}, {format_cell(stat.high)}]"
    return text


# ----- the comparison ------------------------------------------------------------------------
def canonical_names(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results with renamed methods under their current names, so runs recorded before a
    rename land in the same cells as new ones: ``Recipe.aliases`` by name, ``Recipe.formerly``
    by name and recorded components (a name that now belongs to another recipe)."""
    from prunebench.harness.manager import default_host

    host = default_host()
    former: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for recipe in host.recipes.values():
        for old in recipe.formerly:
            former.setdefault(old, []).append((recipe.name, {k: c.name for k, c in recipe.components.items()}))
    out = []
    for r in results:
        name = r["recipe"]["name"]
        base, bracket, rest = name.partition("[")
        if base in former:
            new = _former_recipe(former[base], r["recipe"].get("components", {}), rest)
            if new:
                r = {**r, "recipe": {**r["recipe"], "name": new + bracket + rest}}
        elif base in host.aliases:
            r = {**r, "recipe": {**r["recipe"], "name": host.aliases[base] + bracket + rest}}
        out.append(r)
    return out


def _former_recipe(candidates: list[tuple[str, dict[str, str]]], recorded: dict[str, Any], overrides: str) -> str | None:
    """The recipe whose components the recorded ones are, apart from the kinds a ``--set``
    override (``[attention=keep,ffn.damping=0.1]``) changed. A result that recorded no
    components comes from a benchmark file older than any rename (schema 2 always records
    them): it is the former recipe's."""
    if not recorded:
        return candidates[0][0]
    changed = {item.split("=")[0].split(".")[0] for item in overrides.rstrip("]").split(",") if item}
    names = {kind: c.get("name") for kind, c in recorded.items()}
    for recipe, components in candidates:
        kinds = (set(components) & set(names)) - changed
        if kinds and all(components[k] == names[k] for k in kinds):
            return recipe
    return None


class Comparison:
    """One protocol group: cells, their statistics, the pairwise verdicts and the table."""

    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.results = results = canonical_names(results)
        self.metrics = _metrics()
        self.cells: list[Cell] = group_cells(results)
        self.stats = {c.id: cell_stats(c, lambda r: measures_of(r, "pruned", self.metrics)) for c in self.cells}
        self.verdicts: list[Verdict] = pairwise(self.cells, self.stats)
        self.columns = self._columns()
        self.headline = [key for key, (_, headline) in self.columns.items() if headline]
        self.ranks = {key: ranks(self.cells, self.stats, self.verdicts, key) for key in self.headline}

    def _columns(self) -> dict[str, tuple[str, bool]]:
        cols: dict[str, tuple[str, bool]] = {}
        for phase in ("dense", "pruned"):
            for r in self.results:
                for m in measures_of(r, phase, self.metrics):
                    cols.setdefault(m.key, (m.header, m.headline))
        return cols

    def header(self) -> list[str]:
        ranked = [f"rank {self.columns[k][0]}" for k in self.headline]
        return ["method", "sparsity", "achieved", "paper count", "seeds", *[h for h, _ in self.columns.values()], *ranked,
                "prune s"]

    def rows(self) -> list[list[Any]]:
        dense = {m.key: m for m in measures_of(self.results[0], "dense", self.metrics)}
        out: list[list[Any]] = [["dense", 0.0, 0.0, 0.0, "-", *[format_cell(dense[k].value) if k in dense else "-"
                                                                for k in self.columns], *["-"] * len(self.headline), None]]
        for cell in self.cells:
            first = cell.results[0]
            own = {m.key: m for m in measures_of(first, "pruned", self.metrics)}
            stats = self.stats[cell.id]
            achieved = [r["sparsity"].get("achieved") for r in cell.results]
            paper = [r["sparsity"].get("paper_count") for r in cell.results]
            prune_s = [r["timings"]["stages_s"].get("prune") for r in cell.results]
            out.append([
                cell.label, "set" if cell.sparsity is None else cell.sparsity, _mean(achieved), _mean(paper),
                len(cell.results),
                *[_with_interval(stats.get(k), own.get(k)) if (k in stats or k in own) else "-" for k in self.columns],
                *[self.ranks[k].get(cell.id, "-") for k in self.headline],
                _mean(prune_s),
            ])
        return out

    def flagged(self) -> bool:
        return any(m.flag for r in self.results for m in measures_of(r, "pruned", self.metrics))

    def verdict_lines(self) -> list[str]:
        lines = []
        for v in self.verdicts:
            header = self.columns.get(v.key, (v.key, False))[0]
            at = "" if v.sparsity is None else f" at {v.sparsity:g}"
            scale = "log-PPL" if v.test == TEST_UNITS else "acc"
            note = f"; {v.note}" if v.note else ""
            lines.append(f"- {header}{at}: {v.a} vs {v.b}: **{v.verdict}** ({scale} difference {v.difference:+.4f}, "
                         f"95% [{v.low:+.4f}, {v.high:+.4f}], {v.seeds} seed(s){note})")
        return lines

    def footnotes(self) -> list[str]:
        notes = [f"Intervals and verdicts: perplexity by {TEST_UNITS}; accuracy by {TEST_STDERR}. "
                 "Ranks count significant wins only: `=k` marks cells within each other's noise. "
                 "'paper count' is the sparsity a per-head / per-neuron count would claim."]
        if self.flagged():
            notes.append("* timing measured under load or with the dense model drifting: not a speed claim.")
        unknown = unknown_metric_keys(self.results)
        if unknown:
            notes.append(f"Metrics in the files that no installed plugin renders: {', '.join(unknown)}.")
        return notes


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return sum(vals) / len(vals) if vals else None


def markdown(results: list[dict[str, Any]]) -> str:
    parts = []
    for pid, group in group_by_protocol(results).items():
        comparison = Comparison(group)
        seeds = sorted({int(r["spec"].get("seed", 0)) for r in group})
        parts.append(f"Protocol `{pid}`: {describe_protocol(group[0])}; seeds {', '.join(map(str, seeds))}\n")
        parts.append(tabulate([[format_cell(c) for c in row] for row in comparison.rows()], headers=comparison.header(),
                              tablefmt="github", disable_numparse=True))
        parts.append("")
        parts.extend(comparison.footnotes())
        verdicts = comparison.verdict_lines()
        if verdicts:
            parts.append("")
            parts.append("Verdicts (A vs B: A is better / worse / not significantly different):")
            parts.extend(verdicts)
        parts.append("")
    return "\n".join(parts)


def print_rich(results: list[dict[str, Any]]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # A log file or CI has no terminal width; the Table-1 layout needs ~200 columns.
    console = Console(width=None if sys.stdout.isatty() else 240)
    for pid, group in group_by_protocol(results).items():
        comparison = Comparison(group)
        table = Table(title=f"protocol {pid}", caption=describe_protocol(group[0]))
        for h in comparison.header():
            table.add_column(h, justify="left" if h == "method" else "right")
        for row in comparison.rows():
            # Recipe names with overrides ("intraslice[ffn=keep]") are text, not rich markup.
            table.add_row(*[Text(format_cell(c)) for c in row])
        console.print(table)
        for line in comparison.footnotes():
            console.print(line, markup=False)
        significant = [line for line in comparison.verdict_lines() if "no significant" not in line]
        tied = len(comparison.verdicts) - len(significant)
        for line in significant:
            console.print(line, markup=False)
        if tied:
            console.print(f"{tied} pair(s) with no significant difference (see the markdown report for each).")


# ----- the compact Table-1 layout ------------------------------------------------------------------
def compact_markdown(results: list[dict[str, Any]]) -> str:
    """One row per method, one column per sparsity, each cell the headline measures
    ("wiki / books / avg acc"), means over seeds; rows ordered by the mean rank of the
    first headline measure over the sparsities they share. One table per protocol."""
    parts = []
    for pid, group in group_by_protocol(results).items():
        comparison = Comparison(group)
        keys = comparison.headline
        sparsities = sorted({c.sparsity for c in comparison.cells if c.sparsity is not None})
        table: dict[str, dict[float, str]] = defaultdict(dict)
        first_value: dict[str, dict[float, float]] = defaultdict(dict)
        for c in comparison.cells:
            stats = comparison.stats[c.id]
            table[c.label][c.sparsity] = " / ".join(format_cell(stats[k].mean) if k in stats else "-" for k in keys)
            if keys and keys[0] in stats:
                first_value[c.label][c.sparsity] = stats[keys[0]].mean
        first_stat = next((comparison.stats[c.id][keys[0]] for c in comparison.cells if keys and keys[0] in comparison.stats[c.id]), None)
        sign = -1.0 if first_stat is not None and first_stat.better == "higher" else 1.0

        dense = {m.key: m for m in measures_of(group[0], "dense", comparison.metrics)}
        header = ["method", *[f"{s:.0%}" for s in sparsities]]
        rows = [["dense", " / ".join(format_cell(dense[k].value) if k in dense else "-" for k in keys), *[""] * (len(sparsities) - 1)]]
        rows += [[m, *[table[m].get(s, "-") for s in sparsities]] for m in order_by_mean_rank(table, first_value, sparsities, sign)]
        parts.append(f"Protocol `{pid}`: {describe_protocol(group[0])}; cells: "
                     + " / ".join(comparison.columns[k][0] for k in keys) + "\n")
        parts.append(tabulate(rows, headers=header, tablefmt="github", disable_numparse=True))
        parts.append("")
    return "\n".join(parts)


def order_by_mean_rank(rows: dict[str, Any], values: dict[str, dict[float, float]], sparsities: list[float],
                       sign: float) -> list[str]:
    """Row names ordered by their mean rank (best first) over the sparsities; a row
    without a value at a sparsity ranks last there."""
    def mean_rank(name: str) -> float:
        return sum(sorted(values, key=lambda o: sign * values[o].get(s, 1e30)).index(name) for s in sparsities if name in values)

    return sorted(rows, key=mean_rank)


# ----- pruning cost ------------------------------------------------------------------------------------
def cost_rows(results: list[dict[str, Any]], reference: str = "slicegpt") -> tuple[list[str], list[list[Any]]]:
    """Pruning cost per method and sparsity (the paper's Table 7): wall time of the pruning
    stages, its ratio to ``reference``'s time at the same sparsity and protocol, and the
    peak RSS after pruning. Timings are only comparable within one machine and load."""
    header = ["method", "sparsity", "seed", "prune s", f"x {reference}", "importance s", "layer loop s", "peak RSS GiB"]
    ref_time = {
        (r["spec"].get("protocol_id"), r["sparsity"]["target"], r["spec"].get("seed", 0)): r["timings"]["stages_s"].get("prune")
        for r in results if r["recipe"]["name"] == reference
    }
    out = []
    for r in sorted(results, key=lambda r: (r["sparsity"]["target"] or 0.0, r["recipe"]["name"], r["spec"].get("seed", 0))):
        stages = r["timings"]["stages_s"]
        base = ref_time.get((r["spec"].get("protocol_id"), r["sparsity"]["target"], r["spec"].get("seed", 0)))
        prune_s = stages.get("prune")
        memory = r.get("memory") or {}
        peak = memory.get("peak_rss_after_prune_mb", memory.get("peak_rss_mb"))
        out.append([r["recipe"]["name"], r["sparsity"]["target"], r["spec"].get("seed", 0), prune_s,
                    prune_s / base if base and prune_s is not None else None,
                    stages.get("prune.importance"), stages.get("prune.layer_loop"),
                    peak / 1024.0 if peak is not None else None])
    return header, out


def cost_markdown(results: list[dict[str, Any]], reference: str = "slicegpt") -> str:
    header, body = cost_rows(results, reference)
    return tabulate([[format_cell(c) for c in row] for row in body], headers=header, tablefmt="github", disable_numparse=True)


# ----- sweeps -----------------------------------------------------------------------------------------------
def field_value(result: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a result (``spec.protocol.calibration.samples``,
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
    to different protocols, so unlike the comparison this table spans protocol groups.
    Results without the field are left out."""
    sources = sorted({s for r in results for s in (r["metrics"]["pruned"].get("ppl") or {})})
    label = key.rsplit(".", 1)[-1]
    header = ["method", "sparsity", label, "seed", "achieved", *[f"PPL {s}" for s in sources], "avg acc", "prune s"]
    out = []
    having = [r for r in results if _has_field(r, key)]
    if not having:
        field_value(results[0], key)  # raises KeyError naming the missing part
    for r in having:
        m = r["metrics"]["pruned"]
        out.append([r["spec"].get("method", r["recipe"]["name"]), r["sparsity"]["target"], field_value(r, key),
                    r["spec"].get("seed", 0), r["sparsity"]["achieved"], *[(m.get("ppl") or {}).get(s) for s in sources],
                    (m.get("zeroshot") or {}).get("average"), r["timings"]["stages_s"].get("prune")])
    out.sort(key=lambda row: (str(row[0]), row[1] or 0.0, str(row[2]), row[3]))
    return header, out


def sweep_markdown(results: list[dict[str, Any]], key: str) -> str:
    header, body = sweep_rows(results, key)
    table = tabulate([[format_cell(c) for c in row] for row in body], headers=header, tablefmt="github", disable_numparse=True)
    left_out = len(results) - len(body)
    return table + (f"\n\n({left_out} result(s) without `{key}` left out)" if left_out else "")


def sweep_plot(results: list[dict[str, Any]], key: str, path: str | Path) -> Path:
    """Perplexity per evaluation source against the swept value, one line per method and sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, body = sweep_rows(results, key)
    ppl_columns = [i for i, h in enumerate(header) if h.startswith("PPL ")]
    fig, axes = plt.subplots(1, max(len(ppl_columns), 1), figsize=(4.2 * max(len(ppl_columns), 1), 3.4), squeeze=False)
    for ax, col in zip(axes[0], ppl_columns):
        for method, sparsity in sorted({(row[0], row[1]) for row in body}, key=lambda t: (t[0], t[1] or 0.0)):
            pts = [(row[2], row[col]) for row in body if (row[0], row[1]) == (method, sparsity) and row[col] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} @{sparsity:g}")
        ax.set_xlabel(header[2])
        ax.set_ylabel(header[col])
        ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, Path(path))


# ----- plots -----------------------------------------------------------------------------------------------------
def plots(results: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Per protocol group: each headline measure against achieved sparsity with its 95%
    interval as error bars, accuracy against prefill latency (a Pareto view) when timed,
    and pruning time per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for pid, group in group_by_protocol(results).items():
        comparison = Comparison(group)
        dense = {m.key: m for m in measures_of(group[0], "dense", comparison.metrics)}
        keys = comparison.headline
        fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 3.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            by_method: dict[str, list[tuple[float, CellStat]]] = defaultdict(list)
            for c in comparison.cells:
                if key in comparison.stats[c.id] and c.sparsity is not None:
                    achieved = _mean([r["sparsity"].get("achieved") for r in c.results])
                    by_method[c.label].append((achieved, comparison.stats[c.id][key]))
            for name, pts in sorted(by_method.items()):
                pts.sort(key=lambda p: p[0])
                xs = [p[0] for p in pts]
                ys = [p[1].mean for p in pts]
                low = [p[1].mean - (p[1].low if p[1].low is not None else p[1].mean) for p in pts]
                high = [(p[1].high if p[1].high is not None else p[1].mean) - p[1].mean for p in pts]
                ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
            if key in dense and dense[key].value is not None:
                ax.axhline(dense[key].value, color="gray", linestyle="--", label="dense")
            ax.set_xlabel("achieved decoder sparsity")
            ax.set_ylabel(comparison.columns[key][0])
            if key.startswith("ppl:"):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.suptitle("Headline measures vs sparsity (95% intervals)")
        written.append(_save(fig, out / f"headline_vs_sparsity_{pid}.png"))

        timed = [(m, r) for r in group for m in measures_of(r, "pruned", comparison.metrics) if m.key == "timing:prefill"]
        if timed:
            fig, ax = plt.subplots(figsize=(6, 4))
            by_method_pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for m, r in timed:
                acc = next((x.value for x in measures_of(r, "pruned", comparison.metrics) if x.key == "zeroshot:average"), None)
                if m.value and acc is not None:
                    by_method_pts[r["recipe"]["name"]].append((1.0 / m.value, acc))
            for name, pts in sorted(by_method_pts.items()):
                ax.scatter(*zip(*pts), label=name)
            if "zeroshot:average" in dense:
                ax.scatter([1.0], [dense["zeroshot:average"].value], marker="*", s=120, color="black", label="dense")
            ax.set_xlabel("prefill latency / dense")
            ax.set_ylabel("average zero-shot accuracy")
            ax.legend(fontsize=7)
            ax.set_title("Accuracy vs latency")
            written.append(_save(fig, out / f"accuracy_vs_latency_{pid}.png"))

        fig, ax = plt.subplots(figsize=(6, 4))
        by_name: dict[str, list[float]] = defaultdict(list)
        for r in group:
            by_name[r["recipe"]["name"]].append(r["timings"]["stages_s"].get("prune", 0.0) or 0.0)
        names = sorted(by_name)
        ax.barh(names, [sum(by_name[n]) / len(by_name[n]) for n in names])
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
