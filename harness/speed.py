"""Speed of many saved pruned models against one dense model, timed in one process
(the paper's Figure 10): ``prunebench speed``.

Each ``prunebench run`` times its pruned model against dense, but runs made side by side
on a shared machine give latencies that mean little. ``speed_sweep`` times saved pruned
models (``prunebench run ... --save DIR``) one after another on a machine left idle for
it, the dense model once before and once after them (the drift between the two says
whether the machine stayed idle), and records the load other processes put on the
machine meanwhile (``harness.cpu_load``). Latency depends on the shapes only, so
``shapes_only`` builds each model from its ``config.json`` with random weights.

What each model is (method, target and achieved sparsity, the dense model it came from)
is read from the provenance its config records (``harness.session``); a model saved
before provenance existed is labelled by its folder name ``<method>_<sparsity>``, said so
in its row. The share of attention's *core* kept (query heads x (qk + v dims): the score
and value products against the context) and of the KV cache come from the model itself.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from prunebench.harness.cache import atomic_write_json

COLUMNS = (
    ("prefill", ("ratios", "prefill_latency_ratio")),
    ("decode", ("ratios", "decode_latency_ratio")),
    ("layer prefill", ("layer", "ratios", "layer_prefill_latency_ratio")),
    ("layer decode", ("layer", "ratios", "layer_decode_latency_ratio")),
)


def provenance_of(directory: Path) -> dict[str, Any]:
    """The provenance a saved pruned model records; for an older model without one, its
    method and target from a ``<method>_<sparsity>`` folder name (``"source": "folder name"``)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    provenance = config.get("provenance")
    if provenance:
        return {**provenance, "source": "config"}
    match = re.fullmatch(r"(.+)_([0-9.]+)", Path(directory).name)
    method, target = (match.group(1), float(match.group(2))) if match else (Path(directory).name, None)
    return {"method": method, "target": target, "source": "folder name"}


def load_pruned(directory: Path, shapes_only: bool) -> Any:
    from prunebench.harness.pruned_model import PrunedConfig, PrunedForCausalLM, register_auto_classes

    register_auto_classes()
    if shapes_only:
        torch.manual_seed(0)
        return PrunedForCausalLM(PrunedConfig.from_pretrained(directory)).eval()
    return PrunedForCausalLM.from_pretrained(directory).eval()


def _dig(d: dict[str, Any], path: tuple[str, ...]) -> float:
    for key in path:
        d = d[key]
    return float(d)


def speed_sweep(models: list[Path], base: str | None = None, profile: str = "offline", device: str = "cpu",
                shapes_only: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Time every saved model against the dense ``base`` (from the models' provenance
    when not given); returns the settings, the dense timings before and after, the drift,
    the load, and one row per model."""
    from prunebench.harness.adapters import to_pruned
    from prunebench.harness.cpu_load import watch_load
    from prunebench.harness.errors import UsageError
    from prunebench.harness.models import load_source_model
    from prunebench.harness.params import attention_core_width, attention_params, decoder_params, kv_cache_width
    from prunebench.harness.profiles import get_profile
    from prunebench.harness.timing import measure_against_dense, time_model

    provenances = [provenance_of(m) for m in models]
    bases = {p.get("source_model") for p in provenances if p.get("source_model")}
    if base is None:
        if len(bases) > 1:
            raise UsageError(f"the models come from different dense models ({', '.join(sorted(bases))}); time them apart")
        base = next(iter(bases), "smollm2-135m")
    settings = get_profile(profile).timing
    dev = torch.device(device)
    source = load_source_model(base, device=device).model
    dense_format = to_pruned(source)
    dense = {"decoder": decoder_params(dense_format), "attention": sum(attention_params(l) for l in dense_format.model.layers),
             "core": attention_core_width(dense_format), "cache": kv_cache_width(dense_format)}
    del dense_format
    common = {k: settings[k] for k in ("batch", "seqlen", "decode_tokens", "kv_len", "warmup", "repeats")}
    start = time.perf_counter()
    rows, raw = [], []
    with watch_load() as load:
        dense_before = time_model(source, vocab_size=source.config.vocab_size, device=dev, **common)
        for folder, prov in zip(models, provenances):
            model = load_pruned(folder, shapes_only).to(dev)
            timing = measure_against_dense(source, model, settings, dev, dense=dense_before)
            row = {
                "method": prov.get("method"), "target": prov.get("target"), "label_from": prov["source"],
                "folder": str(folder), "achieved": 1.0 - decoder_params(model) / dense["decoder"],
                "attention_kept": sum(attention_params(l) for l in model.model.layers) / dense["attention"],
                "attention_core_kept": attention_core_width(model) / dense["core"],
                "kv_cache_kept": kv_cache_width(model) / dense["cache"],
            }
            row.update({column: _dig(timing, path) for column, path in COLUMNS})
            rows.append(row)
            raw.append({"folder": str(folder), "timing": timing})
            if show_progress:
                print(f"{row['method']:12s} {row['target']}: achieved {row['achieved']:.3f}, "
                      + ", ".join(f"{c} x{row[c]:.3f}" for c, _ in COLUMNS), flush=True)
            del model
        dense_after = time_model(source, vocab_size=source.config.vocab_size, device=dev, **common)
    drift = {k: dense_after[k] / dense_before[k] for k in ("prefill_s", "decode_s_per_token")}
    if show_progress:
        print(f"dense drift over the sweep (after / before): prefill x{drift['prefill_s']:.3f}, decode "
              f"x{drift['decode_s_per_token']:.3f}; other processes took {load[0].other_share or 0:.0%} of the CPU; "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return {"settings": settings, "device": str(dev), "threads": torch.get_num_threads(), "base": base,
            "shapes_only": shapes_only, "dense_drift": drift, "load": load[0].to_dict(), "dense": dense_before,
            "rows": rows, "raw": raw}


def write_sweep(sweep: dict[str, Any], path: str | Path) -> Path:
    atomic_write_json(Path(path), json.loads(json.dumps(sweep, default=str)))
    return Path(path)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| method | target | achieved | attention params kept | attention core kept | KV cache kept | "
            + " | ".join(f"{c} x" for c, _ in COLUMNS) + " |")
    lines = [head, "|" + "---|" * (6 + len(COLUMNS))]
    for r in sorted(rows, key=lambda r: (str(r["method"]), r["target"] or 0)):
        cells = [str(r["method"]), f"{r['target']:.2f}" if r["target"] is not None else "-", f"{r['achieved']:.3f}",
                 f"{r['attention_kept']:.2f}", f"{r['attention_core_kept']:.2f}", f"{r['kv_cache_kept']:.2f}"]
        cells += [f"{r[c]:.3f}" for c, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pivot_markdown(rows: list[dict[str, Any]], column: str) -> str:
    """One column of the sweep as method x target sparsity, so methods compare at a glance;
    rows ordered by their mean over the sparsities every method has (fastest first), so a
    method is not ranked by cells the others lack."""
    targets = sorted({r["target"] for r in rows if r["target"] is not None})
    cells: dict[str, dict[float, float]] = {}
    for r in rows:
        if r["target"] is not None:
            cells.setdefault(str(r["method"]), {})[r["target"]] = r[column]
    shared = [t for t in targets if all(t in row for row in cells.values())] or targets
    order = sorted(cells, key=lambda m: sum(cells[m].get(t, 0.0) for t in shared) / len(shared))
    unit = " x" if column in dict(COLUMNS) else ""  # latency ratios; the kept shares are plain fractions
    lines = [f"| {column}{unit} | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for method in order:
        lines.append(f"| {method} | " + " | ".join(
            f"{cells[method][t]:.3f}" if t in cells[method] else "-" for t in targets) + " |")
    return "\n".join(lines) + "\n"


def check_pivots(pivots: list[str]) -> None:
    """Refuse pivot columns the sweep does not have, naming the valid ones."""
    from prunebench.harness.errors import UsageError

    valid = [c for c, _ in COLUMNS] + ["attention_core_kept", "kv_cache_kept", "attention_kept"]
    bad = [p for p in pivots if p not in valid]
    if bad:
        raise UsageError(f"unknown --pivot column(s) {', '.join(bad)}; valid: {', '.join(valid)}")


def render(rows: list[dict[str, Any]], pivots: list[str]) -> str:
    """The full table, then one pivot per requested column."""
    check_pivots(pivots)
    return "\n".join([markdown(rows)] + [pivot_markdown(rows, column) for column in pivots])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4), sharey=True)
    methods = sorted({str(r["method"]) for r in rows})
    for ax, (column, _) in zip(axes, COLUMNS):
        for method in methods:
            pts = sorted((r["achieved"], r[column]) for r in rows if str(r["method"]) == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{column} latency / dense")
        ax.set_xlabel("achieved decoder sparsity")
    axes[0].set_ylabel("latency ratio (lower is faster)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
