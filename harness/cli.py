"""``prunebench``: list, run, compare, ablate, report, offload, eval.

Bad input exits with status 2 and one line on stderr, before anything is computed or
written (``UsageError``); other failures exit 1 with the error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prunebench.harness.errors import PruneBenchError, UsageError

DEFAULT_RESULTS = "runs"


def _add_protocol_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="named model, local dir, .gguf file or hub id")
    p.add_argument("--profile", default="offline", help="ci | offline | paper")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KIND=NAME|KIND.PARAM=VALUE",
                   help="swap a component or set a parameter (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--calibration", dest="calibration_source", help="calibration data source")
    p.add_argument("--calibration-samples", type=int)
    p.add_argument("--calibration-seqlen", type=int)
    p.add_argument("--eval", dest="eval_sources", help="comma-separated perplexity sources")
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--eval-seqlen", type=int)
    p.add_argument("--tasks", help="comma-separated zero-shot tasks ('none' for no zero-shot)")
    p.add_argument("--limit", dest="task_limit", type=int, help="zero-shot items per task")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-zeroshot", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="recompute cached dense metrics and statistics")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="folder for result JSON files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _profile_overrides(args: argparse.Namespace) -> dict[str, Any]:
    over: dict[str, Any] = {}
    for key in ("calibration_source", "calibration_samples", "calibration_seqlen", "eval_samples", "eval_seqlen",
                "task_limit", "batch_size"):
        if getattr(args, key, None) is not None:
            over[key] = getattr(args, key)
    if args.eval_sources:
        over["eval_sources"] = [s for s in args.eval_sources.split(",") if s]
    if args.tasks:
        over["tasks"] = [] if args.tasks == "none" else [t for t in args.tasks.split(",") if t]
    return over


def _spec(args: argparse.Namespace, method: str, sparsity: float, extra_overrides: list[str] | None = None):
    from prunebench.harness.api import RunSpec

    if args.no_zeroshot and args.tasks and args.tasks != "none":
        raise UsageError("--tasks conflicts with --no-zeroshot")
    if args.no_zeroshot and args.task_limit is not None:
        raise UsageError("--limit conflicts with --no-zeroshot")

    return RunSpec(
        model=args.model, method=method, sparsity=sparsity, overrides=[*args.overrides, *(extra_overrides or [])],
        profile=args.profile,
        profile_overrides=_profile_overrides(args), seed=args.seed, device=args.device, dtype=args.dtype,
        zeroshot=not args.no_zeroshot and args.tasks != "none", timing=not args.no_timing,
        save_dir=getattr(args, "save", None), use_cache=not args.no_cache,
    )


def _write_text(path: str, text: str) -> None:
    """Write a report file (tables) atomically, making its folder: an interrupted report
    leaves the previous file, never half of a new one."""
    from prunebench.harness.cache import atomic_write_bytes

    atomic_write_bytes(path, (text + "\n").encode())


def _parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--sparsities expects numbers like 0.2,0.3, got {text!r}") from None
    if not values:
        raise UsageError("--sparsities is empty")
    return values


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from prunebench.harness.adapters import supported_architectures
    from prunebench.harness.contracts import COMPONENT_KINDS
    from prunebench.harness.data import list_sources
    from prunebench.harness.manager import PluginHost
    from prunebench.harness.models import list_models
    from prunebench.harness.profiles import PROFILES

    host = PluginHost()
    console = Console()
    table = Table(title="components")
    for col in ("kind", "name", "parameters", "what it does"):
        table.add_column(col)
    for kind in COMPONENT_KINDS:
        for name in host.names(kind):
            c = host.component(kind, name)
            table.add_row(kind, name, ", ".join(f"{k}={v}" for k, v in c.defaults.items()), c.summary)
    console.print(table)
    methods = Table(title="methods (recipes)")
    for col in ("method", "components", "description"):
        methods.add_column(col)
    for name in sorted(host.recipes):
        r = host.resolve(name)
        methods.add_row(name, ", ".join(f"{k}={v.name}" for k, v in r.components.items()), host.recipes[name].description)
    console.print(methods)
    console.print(f"[bold]models:[/] {', '.join(list_models())} (or a local dir, a .gguf file, a hub id)")
    console.print(f"[bold]architectures:[/] {', '.join(supported_architectures())}")
    console.print(f"[bold]data sources:[/] {', '.join(list_sources())}, text:PATH")
    console.print(f"[bold]profiles:[/] {', '.join(PROFILES)}")
    try:
        from prunebench.harness.zeroshot import list_tasks

        console.print(f"[bold]zero-shot tasks:[/] {', '.join(list_tasks())}")
    except ImportError:
        pass
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from prunebench.harness.api import run_experiment
    from prunebench.harness.report import print_rich

    result = run_experiment(_spec(args, args.method, args.sparsity), results_dir=args.results,
                            show_progress=not args.quiet)
    print_rich([result])
    print(f"result: {result['path']}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from prunebench.harness.grid import run_grid
    from prunebench.harness.report import markdown, print_rich

    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        raise UsageError("--methods is empty: a grid needs at least one method")
    specs = [_spec(args, m, s) for m in methods for s in _parse_sparsities(args.sparsities)]
    results = run_grid(specs, args.results, shard=args.shard, show_progress=not args.quiet, executor=_executor(args))
    print_rich(results)
    if args.markdown:
        _write_text(args.markdown, markdown(results))
    return 0


def _executor(args: argparse.Namespace):
    from prunebench.harness.executors import Resources, make_executor

    if args.workers < 1 or args.cpus_per_task <= 0 or args.gpus_per_task < 0:
        raise UsageError("--workers and --cpus-per-task must be positive, --gpus-per-task at least 0")
    resources = Resources(cpus=args.cpus_per_task, gpus=args.gpus_per_task, memory_gb=args.memory_gb_per_task)
    return make_executor(args.executor, address=args.ray_address, workers=args.workers, resources=resources,
                         folder=args.slurm_folder, partition=args.slurm_partition)


def cmd_ablate(args: argparse.Namespace) -> int:
    from prunebench.harness.ablation import ablation_rows, ablation_specs, ablation_table
    from prunebench.harness.grid import run_grid
    from prunebench.harness.manager import PluginHost

    host = PluginHost()
    rows = ablation_rows(host, args.method, uniform=not args.no_uniform)
    sparsities = _parse_sparsities(args.sparsity)
    specs = ablation_specs(rows, sparsities, lambda m, s, extra: _spec(args, m, s, extra))
    results = run_grid(specs, args.results, shard=args.shard, show_progress=not args.quiet, host=host)
    table = ablation_table(rows, sparsities, results, base_overrides=args.overrides)
    print(table)
    if args.markdown:
        _write_text(args.markdown, table)
        print(f"markdown: {args.markdown}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from prunebench.harness.report import markdown, plots, print_rich
    from prunebench.harness.results import load_results

    results = load_results(args.paths)
    if not results:
        raise UsageError(f"no result files found in {', '.join(args.paths)}")
    if args.sweep:
        from prunebench.harness.report import sweep_markdown, sweep_plot

        try:
            table = sweep_markdown(results, args.sweep)
        except KeyError as exc:
            raise UsageError(str(exc.args[0])) from None
        print(table)
        if args.markdown:
            _write_text(args.markdown, table)
            print(f"markdown: {args.markdown}")
        if args.plots:
            print(f"plot: {sweep_plot(results, args.sweep, Path(args.plots) / 'sweep.png')}")
        return 0
    print_rich(results)
    text = markdown(results)
    if args.markdown:
        _write_text(args.markdown, text)
        print(f"markdown: {args.markdown}")
    if args.plots:
        for p in plots(results, args.plots):
            print(f"plot: {p}")
    if args.cost:
        from prunebench.harness.report import cost_markdown

        table = cost_markdown(results, reference=args.cost_reference)
        print(table)
        _write_text(args.cost, table)
        print(f"cost table: {args.cost}")
    return 0


def cmd_offload(args: argparse.Namespace) -> int:
    import gc
    import json

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from prunebench.harness.cache import atomic_write_json
    from prunebench.harness.data import calibration_batch, evaluation_windows, load_corpus
    from prunebench.harness.models import parse_dtype
    from prunebench.harness.offload import prune_offloaded, release_freed_memory

    if not Path(args.model).is_dir():
        raise UsageError(f"--model must be a local checkpoint directory (safetensors), got {args.model!r}")
    dtype = parse_dtype(args.dtype)
    spill = None
    if args.spill_activations:
        spill = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.spill_activations)
        if spill is None:
            raise UsageError(f"--spill-activations must be bfloat16 or float16, got {args.spill_activations!r}")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_pos = AutoConfig.from_pretrained(args.model).max_position_embeddings
    calibration = calibration_batch(tokenizer, load_corpus(args.calibration), args.calibration_samples,
                                    args.calibration_seqlen, args.seed, max_pos)
    windows = None
    if args.eval != "none":
        windows = evaluation_windows(tokenizer, load_corpus(args.eval), args.eval_samples, args.eval_seqlen, max_pos)
    # Tokenising whole corpora leaves a few hundred MB of freed heap behind; give it back
    # before the model's layers start coming and going.
    gc.collect()
    release_freed_memory()
    result = prune_offloaded(args.model, args.out, args.method, args.sparsity, calibration, eval_windows=windows,
                             batch_size=args.batch_size, seed=args.seed, dtype=dtype, overrides=tuple(args.overrides),
                             show_progress=not args.quiet, spill_dtype=spill)
    text = json.dumps({k: result[k] for k in ("method", "sparsity", "metrics", "seconds", "peak_rss_mb", "spill", "output")},
                      indent=1)
    print(text)
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(result, default=str)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoTokenizer

    from prunebench.harness.cache import atomic_write_json
    from prunebench.harness.data import evaluation_windows, load_corpus
    from prunebench.harness.evaluate import execution_device, load_dispatched, parse_max_memory
    from prunebench.harness.perplexity import perplexity

    max_memory = parse_max_memory(args.max_memory)
    model = load_dispatched(args.model, device_map=args.device_map, max_memory=max_memory,
                            offload_folder=args.offload_folder)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    max_pos = model.config.max_position_embeddings
    device = execution_device(model)
    out: dict[str, Any] = {"model": args.model, "device_map": getattr(model, "hf_device_map", None), "ppl": {}}
    for source in [s for s in args.eval.split(",") if s and s != "none"]:
        windows = evaluation_windows(tokenizer, load_corpus(source), args.eval_samples, args.eval_seqlen, max_pos)
        out["ppl"][source] = perplexity(model, windows, batch_size=args.batch_size, device=device,
                                        progress=not args.quiet).ppl
    if args.tasks and args.tasks != "none":
        from prunebench.harness.zeroshot import evaluate_zeroshot

        result = evaluate_zeroshot(model, tokenizer, tasks=args.tasks.split(","), limit=args.limit,
                                   batch_size=args.batch_size, max_length=min(args.max_length, max_pos))
        out["zeroshot"] = result.to_dict()
    summary = {"ppl": out["ppl"], "zeroshot_average": out.get("zeroshot", {}).get("average"),
               "device_map": out["device_map"]}
    print(json.dumps(summary, indent=1, default=str))
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(out, default=str)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunebench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="components, methods, models, data sources, profiles").set_defaults(func=cmd_list)

    run = sub.add_parser("run", help="prune one model with one method at one sparsity")
    run.add_argument("--method", required=True)
    run.add_argument("--sparsity", type=float, required=True)
    run.add_argument("--save", help="save the pruned model (save_pretrained) into this folder")
    _add_protocol_args(run)
    run.set_defaults(func=cmd_run)

    cmp_ = sub.add_parser("compare", help="a grid of methods x sparsities under one protocol (resumable)")
    cmp_.add_argument("--methods", required=True, help="comma-separated methods")
    cmp_.add_argument("--sparsities", required=True, help="comma-separated, e.g. 0.2,0.3")
    cmp_.add_argument("--shard", default="0/1", help="I/N: run every N-th grid cell starting at I")
    cmp_.add_argument("--markdown", help="also write the markdown table here")
    cmp_.add_argument("--executor", default="local", help="local (this process) | ray | slurm")
    cmp_.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    cmp_.add_argument("--workers", type=int, default=2, help="parallel cells on a local Ray instance")
    cmp_.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each cell declares (Ray / Slurm)")
    cmp_.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs each cell declares (Ray / Slurm)")
    cmp_.add_argument("--memory-gb-per-task", type=float, help="memory each cell declares (Ray / Slurm)")
    cmp_.add_argument("--slurm-partition", help="Slurm partition (--executor slurm)")
    cmp_.add_argument("--slurm-folder", default="runs/slurm", help="submitit's log and pickle folder")
    _add_protocol_args(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    abl = sub.add_parser("ablate", help="a method's cumulative ablation rows (a paper's ablation table), resumable")
    abl.add_argument("--method", required=True, help="a method that declares ablation rows (e.g. intraslice)")
    abl.add_argument("--sparsity", "--sparsities", dest="sparsity", required=True, help="comma-separated, e.g. 0.2,0.3")
    abl.add_argument("--no-uniform", action="store_true",
                     help="leave out the row with the method's components at uniform ratios")
    abl.add_argument("--markdown", help="also write the ablation table here")
    abl.add_argument("--shard", default="0/1", help="I/N: run every N-th cell starting at I (the table shows this shard's)")
    _add_protocol_args(abl)
    abl.set_defaults(func=cmd_ablate)

    off = sub.add_parser("offload", help="prune a checkpoint on disk layer by layer (models larger than memory)")
    off.add_argument("--model", required=True, help="local checkpoint directory (safetensors, with its tokenizer)")
    off.add_argument("--method", required=True)
    off.add_argument("--sparsity", type=float, required=True)
    off.add_argument("--out", required=True, help="new directory for the pruned checkpoint")
    off.add_argument("--set", dest="overrides", action="append", default=[], metavar="KIND=NAME|KIND.PARAM=VALUE")
    off.add_argument("--calibration", default="wiki-offline", help="calibration data source")
    off.add_argument("--calibration-samples", type=int, default=16)
    off.add_argument("--calibration-seqlen", type=int, default=256)
    off.add_argument("--eval", default="wiki-offline", help="perplexity source ('none' to skip)")
    off.add_argument("--eval-samples", type=int, default=8)
    off.add_argument("--eval-seqlen", type=int, default=256)
    off.add_argument("--batch-size", type=int, default=4)
    off.add_argument("--seed", type=int, default=0)
    off.add_argument("--dtype", default="float32", help="compute dtype of the layer being pruned")
    off.add_argument("--spill-activations", help="keep stored calibration activations on disk in bfloat16 | float16")
    off.add_argument("--json", help="also write the full result here")
    off.add_argument("--quiet", action="store_true")
    off.set_defaults(func=cmd_offload)

    ev = sub.add_parser("eval", help="perplexity and zero-shot of a saved checkpoint, spread over devices and disk")
    ev.add_argument("--model", required=True, help="checkpoint directory (pruned or dense, with its tokenizer)")
    ev.add_argument("--device-map", default="auto", help="accelerate device map: auto | balanced | sequential | cpu")
    ev.add_argument("--max-memory", help="per-device limits, e.g. 0=70GiB,1=70GiB,cpu=100GiB")
    ev.add_argument("--offload-folder", help="where layers that fit nowhere else are memory-mapped")
    ev.add_argument("--eval", default="wiki-offline", help="comma-separated perplexity sources ('none' to skip)")
    ev.add_argument("--eval-samples", type=int, default=8)
    ev.add_argument("--eval-seqlen", type=int, default=512)
    ev.add_argument("--tasks", default="none", help="comma-separated zero-shot tasks")
    ev.add_argument("--limit", type=int, help="zero-shot items per task")
    ev.add_argument("--max-length", type=int, default=2048)
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--json", help="also write the full result here")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="tables and plots from result files")
    rep.add_argument("paths", nargs="+", help="result files or folders")
    rep.add_argument("--markdown", help="write the markdown table to this file")
    rep.add_argument("--plots", help="write PNG plots into this folder")
    rep.add_argument("--cost", help="write the pruning-cost table (time, ratio, peak memory) here")
    rep.add_argument("--cost-reference", default="slicegpt", help="method whose pruning time is 1 in the cost table")
    rep.add_argument("--sweep", metavar="FIELD",
                     help="one row per result against this dotted result field (e.g. "
                          "recipe.components.allocation.params.lambda_b), across protocols; --plots gets sweep.png")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"prunebench: error: {exc}", file=sys.stderr)
        return 2
    except PruneBenchError as exc:
        print(f"prunebench: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
