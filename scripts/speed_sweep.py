"""Speed of many pruned models against one dense model, timed in one process (the paper's Figure 10).

Each ``prunebench run`` already times its pruned model against dense, but runs made side by
side on a shared machine give latencies that mean little. This script times saved pruned
models (``prunebench run ... --save DIR``) one after another on a machine left idle for it,
the dense model once before and once after them (the drift between the two is printed: if
it is large, the machine was not idle). Latency depends on the shapes only, so
``--shapes-only`` builds each model from its ``config.json`` with random weights instead of
loading them.

    python scripts/speed_sweep.py /tmp/models/* --profile offline --json results/speed/speed.json \\
        --markdown results/speed/table.md --plot results/speed/speed.png

A model directory is labelled ``<method>_<sparsity>`` by its name (``--save`` folders named
that way); the achieved sparsity and the share of attention parameters kept come from the
model itself, and so does the share of attention's *core* kept (query heads x (qk + v
dims): the score and value products against the context) and of the KV cache. A method
that shrinks attention's projections but keeps that core (low-rank factors, a narrower
residual stream) cannot shrink attention's cost at long context.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.cache import atomic_write_bytes, atomic_write_json
from prunebench.harness.models import load_source_model
from prunebench.harness.params import attention_params, decoder_params
from prunebench.harness.profiles import get_profile
from prunebench.harness.pruned_model import PrunedConfig, PrunedForCausalLM, register_auto_classes
from prunebench.harness.timing import measure_against_dense, time_model

COLUMNS = (
    ("prefill", ("ratios", "prefill_latency_ratio")),
    ("decode", ("ratios", "decode_latency_ratio")),
    ("layer prefill", ("layer", "ratios", "layer_prefill_latency_ratio")),
    ("layer decode", ("layer", "ratios", "layer_decode_latency_ratio")),
)


def label_of(directory: Path) -> tuple[str, float | None]:
    match = re.fullmatch(r"(.+)_([0-9.]+)", directory.name)
    return (match.group(1), float(match.group(2))) if match else (directory.name, None)


def load_pruned(directory: Path, shapes_only: bool) -> PrunedForCausalLM:
    register_auto_classes()
    if shapes_only:
        torch.manual_seed(0)
        return PrunedForCausalLM(PrunedConfig.from_pretrained(directory)).eval()
    return PrunedForCausalLM.from_pretrained(directory).eval()


def attention_core(config: PrunedConfig) -> tuple[int, int]:
    """Per-token width of attention's own work, summed over layers: query heads x (qk +
    v dims) sets the cost of the score and value products against the context, KV heads x
    (qk + v dims) the KV cache. Projections can shrink (low rank, fewer inputs) while these
    stay: then attention's cost at long context does not shrink."""
    core = cache = 0
    for layer in config.layers:
        attn = layer["attn"]
        heads = len(attn.get("head_to_kv") or [])
        dims = int(attn.get("qk_dim", 0)) + int(attn.get("v_dim", 0))
        core += heads * dims
        cache += int(attn.get("num_kv_heads", 0)) * dims
    return core, cache


def dig(d: dict[str, Any], path: tuple[str, ...]) -> float:
    for key in path:
        d = d[key]
    return float(d)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| method | target | achieved | attention params kept | attention core kept | KV cache kept | "
            + " | ".join(f"{c} x" for c, _ in COLUMNS) + " |")
    lines = [head, "|" + "---|" * (6 + len(COLUMNS))]
    for r in sorted(rows, key=lambda r: (r["method"], r["target"] or 0)):
        cells = [r["method"], f"{r['target']:.2f}" if r["target"] is not None else "-", f"{r['achieved']:.3f}",
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
            cells.setdefault(r["method"], {})[r["target"]] = r[column]
    shared = [t for t in targets if all(t in row for row in cells.values())] or targets
    order = sorted(cells, key=lambda m: sum(cells[m].get(t, 0.0) for t in shared) / len(shared))
    unit = " x" if column in dict(COLUMNS) else ""  # latency ratios; the kept shares are plain fractions
    lines = [f"| {column}{unit} | " + " | ".join(f"{t:.0%}" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for method in order:
        lines.append(f"| {method} | " + " | ".join(
            f"{cells[method][t]:.3f}" if t in cells[method] else "-" for t in targets) + " |")
    return "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], pivots: list[str]) -> str:
    """The full table, then one pivot per requested column."""
    return "\n".join([markdown(rows)] + [pivot_markdown(rows, column) for column in pivots])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4), sharey=True)
    methods = sorted({r["method"] for r in rows})
    for ax, (column, _) in zip(axes, COLUMNS):
        for method in methods:
            pts = sorted((r["achieved"], r[column]) for r in rows if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{column} latency / dense")
        ax.set_xlabel("achieved decoder sparsity")
    axes[0].set_ylabel("latency ratio (lower is faster)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_outputs(rows: list[dict[str, Any]], pivots: list[str], markdown_path: str | None, plot_path: str | None) -> None:
    table = render(rows, pivots)
    print(table)
    if markdown_path:
        atomic_write_bytes(markdown_path, table.encode())  # makes the folder
    if plot_path:
        plot(rows, Path(plot_path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="saved pruned model folders named <method>_<sparsity>")
    parser.add_argument("--from-json", help="re-render the tables and plot of an earlier --json, timing nothing")
    parser.add_argument("--pivot", action="append", default=[], choices=[c for c, _ in COLUMNS]
                        + ["attention_core_kept", "kv_cache_kept"], help="add a method x sparsity table of this column")
    parser.add_argument("--base", default="smollm2-135m", help="the dense model they were pruned from")
    parser.add_argument("--profile", default="offline", help="whose timing settings to use")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes-only", action="store_true", help="random weights from each config.json")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())["rows"]
        write_outputs(rows, args.pivot, args.markdown, args.plot)
        return 0
    if not args.models:
        parser.error("give saved model folders to time, or --from-json to re-render")

    settings = get_profile(args.profile).timing
    device = torch.device(args.device)
    source = load_source_model(args.base, device=args.device).model
    dense_params = to_pruned(source)
    dense_decoder = decoder_params(dense_params)
    dense_attention = sum(attention_params(layer) for layer in dense_params.model.layers)
    dense_core, dense_cache = attention_core(dense_params.config)
    del dense_params
    common = {k: settings[k] for k in ("batch", "seqlen", "decode_tokens", "kv_len", "warmup", "repeats")}
    start = time.perf_counter()
    dense_before = time_model(source, vocab_size=source.config.vocab_size, device=device, **common)
    rows, raw = [], []
    for folder in map(Path, args.models):
        method, target = label_of(folder)
        model = load_pruned(folder, args.shapes_only).to(device)
        timing = measure_against_dense(source, model, settings, device, dense=dense_before)
        row = {
            "method": method, "target": target, "folder": str(folder),
            "achieved": 1.0 - decoder_params(model) / dense_decoder,
            "attention_kept": sum(attention_params(layer) for layer in model.model.layers) / dense_attention,
        }
        core, cache = attention_core(model.config)
        row.update(attention_core_kept=core / dense_core, kv_cache_kept=cache / dense_cache)
        row.update({column: dig(timing, path) for column, path in COLUMNS})
        rows.append(row)
        raw.append({"folder": str(folder), "timing": timing})
        print(f"{method:12s} {target}: achieved {row['achieved']:.3f}, attention params kept {row['attention_kept']:.2f}, "
              f"core {row['attention_core_kept']:.2f}, KV cache {row['kv_cache_kept']:.2f}, "
              + ", ".join(f"{c} x{row[c]:.3f}" for c, _ in COLUMNS), flush=True)
        del model
    dense_after = time_model(source, vocab_size=source.config.vocab_size, device=device, **common)
    drift = {k: dense_after[k] / dense_before[k] for k in ("prefill_s", "decode_s_per_token")}
    print(f"dense drift over the sweep (after / before): prefill x{drift['prefill_s']:.3f}, "
          f"decode x{drift['decode_s_per_token']:.3f}; {time.perf_counter() - start:.0f} s")
    write_outputs(rows, args.pivot, args.markdown, args.plot)
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(
            {"settings": settings, "device": str(device), "threads": torch.get_num_threads(), "base": args.base,
             "shapes_only": args.shapes_only, "dense_drift": drift, "dense": dense_before, "rows": rows, "raw": raw},
            default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
