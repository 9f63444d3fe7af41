"""``prunebench``: list, run, compare, ablate, attribute, report, offload, eval, speed,
regression, noise, results.

Bad input exits with status 2 and one line on stderr, before anything is computed or
written (``UsageError``); other failures exit 1 with the error.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from prunebench.harness.errors import PruneBenchError, UsageError

DEFAULT_RESULTS = "runs"


def _int_or_all(text: str) -> int | str:
    """A size, or ``all`` (every window / every item)."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def _add_protocol_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and protocol")
    g.add_argument("--model", default="smollm2-135m", help="named model (prunebench list), local dir, .gguf file or hub id")
    g.add_argument("--profile", default="offline", help="size profile: ci | offline | paper (prunebench list)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KIND=NAME|KIND.PARAM=VALUE",
                   help="swap a component (KIND=NAME) or set a parameter (KIND.PARAM=VALUE); repeatable")
    g.add_argument("--seed", type=int, default=0, help="calibration seed: which calibration windows are drawn")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (compute and storage)")
    g.add_argument("--calibration", dest="calibration_source", help="calibration data source (prunebench list)")
    g.add_argument("--calibration-samples", type=int, help="calibration sequences (profile's by default)")
    g.add_argument("--calibration-seqlen", type=int, help="calibration sequence length in tokens")
    g.add_argument("--eval", dest="eval_sources", help="comma-separated perplexity sources")
    g.add_argument("--eval-samples", type=_int_or_all, help="perplexity windows per source, or 'all' (whole test text)")
    g.add_argument("--eval-seqlen", type=int, help="perplexity window length in tokens")
    g.add_argument("--tasks", help="comma-separated zero-shot tasks ('none' for no zero-shot)")
    g.add_argument("--limit", dest="task_limit", type=_int_or_all, help="zero-shot items per task, or 'all'")
    g.add_argument("--batch-size", type=int, help="calibration and perplexity batch size")
    g.add_argument("--metrics", help="comma-separated metrics to measure (default: every default metric; prunebench list)")
    g.add_argument("--tune", action="append", default=[], metavar="KIND.PARAM=V1,V2,...",
                   help="pick this parameter among the values by held-out calibration text (repeatable)")
    g.add_argument("--no-zeroshot", action="store_true", help="skip zero-shot accuracy")
    g.add_argument("--no-timing", action="store_true", help="skip the timing against the dense model")
    g.add_argument("--no-cache", action="store_true", help="recompute cached dense metrics and statistics")
    o = p.add_argument_group("output")
    o.add_argument("--results", default=DEFAULT_RESULTS, help="folder for result JSON files")
    o.add_argument("--quiet", action="store_true", help="no progress output")


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


def _parse_tune(items: list[str]) -> dict[str, list[Any]]:
    from prunebench.harness.manager import parse_value

    tune: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise UsageError(f"--tune expects KIND.PARAM=V1,V2,..., got {item!r}")
        tune[key] = [parse_value(v) for v in raw.split(",") if v.strip()]
    return tune


def _spec(args: argparse.Namespace, method: str, sparsity: float | None, extra_overrides: list[str] | None = None,
          seed: int | None = None):
    from prunebench.harness.spec import RunSpec

    if args.no_zeroshot and args.tasks and args.tasks != "none":
        raise UsageError("--tasks conflicts with --no-zeroshot")
    if args.no_zeroshot and args.task_limit is not None:
        raise UsageError("--limit conflicts with --no-zeroshot")
    return RunSpec(
        model=args.model, method=method, sparsity=sparsity, overrides=[*args.overrides, *(extra_overrides or [])],
        profile=args.profile, profile_overrides=_profile_overrides(args), seed=args.seed if seed is None else seed,
        device=args.device, dtype=args.dtype, zeroshot=not args.no_zeroshot and args.tasks != "none",
        timing=not args.no_timing, metrics=[m for m in args.metrics.split(",") if m] if args.metrics else None,
        tune=_parse_tune(args.tune), save_dir=getattr(args, "save", None), use_cache=not args.no_cache,
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


def _seeds(args: argparse.Namespace) -> list[int]:
    from prunebench.harness.spec import parse_seeds

    return parse_seeds(args.seeds) if getattr(args, "seeds", None) else [args.seed]


# ----- commands ------------------------------------------------------------------------------
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
    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title="components")
    for col in ("kind", "name", "parameters", "what it does"):
        table.add_column(col)
    for kind in COMPONENT_KINDS:
        for name in host.names(kind):
            c = host.component(kind, name)
            table.add_row(kind, name, ", ".join(f"{k}={v}" for k, v in c.defaults.items()), c.summary)
    console.print(table)
    methods = Table(title="methods (recipes)")
    for col in ("method", "role", "components", "description"):
        methods.add_column(col)
    for name in sorted(host.recipes):
        r = host.resolve(name)
        recipe = host.recipes[name]
        aliases = f" (formerly {', '.join(recipe.aliases)})" if recipe.aliases else ""
        if recipe.formerly:
            aliases += f" (older results named {', '.join(recipe.formerly)})"
        methods.add_row(name + aliases, recipe.role, ", ".join(f"{k}={v.name}" for k, v in r.components.items()),
                        recipe.description)
    console.print(methods)
    metrics = Table(title="metrics")
    for col in ("metric", "default", "phases", "what it measures"):
        metrics.add_column(col)
    for name, m in host.metrics.items():
        metrics.add_row(name, "yes" if m.default else "no", ", ".join(m.phases), m.summary)
    console.print(metrics)
    console.print(f"[bold]models:[/] {', '.join(list_models())} (or a local dir, a .gguf file, a hub id)")
    console.print(f"[bold]architectures:[/] {', '.join(supported_architectures(host))}")
    console.print(f"[bold]data sources:[/] {', '.join(list_sources())}, text:PATH")
    console.print(f"[bold]profiles:[/] {', '.join(PROFILES)}")
    try:
        from prunebench.harness.zeroshot import list_tasks

        console.print(f"[bold]zero-shot tasks:[/] {', '.join(list_tasks())}")
    except ImportError:
        pass
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from prunebench.harness.report import print_rich
    from prunebench.harness.session import RunSession

    result = RunSession(_spec(args, args.method, args.sparsity), show_progress=not args.quiet).run(args.results).to_dict()
    print_rich([result])
    print(f"result: {result['path']}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from prunebench.harness.grid import run_grid
    from prunebench.harness.report import markdown, print_rich

    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        raise UsageError("--methods is empty: a grid needs at least one method")
    specs = [_spec(args, m, s, seed=seed) for m in methods for s in _parse_sparsities(args.sparsities) for seed in _seeds(args)]
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
    specs = [spec for seed in _seeds(args)
             for spec in ablation_specs(rows, sparsities, lambda m, s, extra, seed=seed: _spec(args, m, s, extra, seed=seed))]
    results = run_grid(specs, args.results, shard=args.shard, show_progress=not args.quiet, host=host)
    table = ablation_table(rows, sparsities, results, base_overrides=args.overrides)
    print(table)
    if args.markdown:
        _write_text(args.markdown, table)
        print(f"markdown: {args.markdown}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from prunebench.harness.attribute import attribution_report, attribution_specs
    from prunebench.harness.grid import run_grid, stored_results
    from prunebench.harness.manager import PluginHost

    host = PluginHost()
    methods = [m for m in args.methods.split(",") if m]
    if len(methods) != 2:
        raise UsageError(f"--methods needs exactly two recipes (A,B), got {args.methods!r}")
    sparsity = float(args.sparsity)
    plan = attribution_specs(host, methods[0], methods[1], lambda m, extra, seed: _spec(args, m, sparsity, extra, seed=seed),
                             _seeds(args))
    specs = [c.spec for c in plan.runnable]
    run_grid(specs, args.results, shard=args.shard, show_progress=not args.quiet, host=host, executor=_executor(args))
    results = stored_results(specs, args.results, host)  # every shard's cells, in plan order
    missing = sum(r is None for r in results)
    if missing:
        print(f"{missing} of {len(results)} cells have no result yet (other shards): the effects below leave them out")
    report = attribution_report(plan, results)
    print(report.markdown())
    markdown_path = args.markdown or str(Path(args.results) / f"attribution-{methods[0]}-vs-{methods[1]}-s{sparsity:g}.md")
    json_path = args.json or str(Path(markdown_path).with_suffix(".json"))
    _write_text(markdown_path, report.markdown())
    _write_text(json_path, report.to_json())
    print(f"markdown: {markdown_path}\njson: {json_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from prunebench.harness.report import compact_markdown, markdown, plots, print_rich
    from prunebench.harness.results import load_results

    results, skipped = load_results(args.paths)
    for path, why in skipped:
        print(f"prunebench: skipped {path}: {why}", file=sys.stderr)
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
    if args.compact:
        text = compact_markdown(results)
        print(text)
    else:
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
                             eval_source=args.eval if args.eval != "none" else "wiki-offline",
                             batch_size=args.batch_size, seed=args.seed, dtype=dtype, overrides=tuple(args.overrides),
                             show_progress=not args.quiet, spill_dtype=spill, tokenizer=tokenizer, results_dir=args.results)
    summary = {"method": result["recipe"]["name"], "sparsity": result["sparsity"],
               "ppl": {phase: (result["metrics"][phase].get("ppl") or {}) for phase in ("dense", "pruned")},
               "seconds": result["timings"]["stages_s"], "peak_rss_mb": result["memory"], "offload": result["pruning"]["offload"],
               "output": result["spec"]["saved_to"], "result": result.get("path")}
    print(json.dumps(summary, indent=1, default=str))
    if args.json:
        from prunebench.harness.cache import atomic_write_json

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
    out: dict[str, Any] = {"model": args.model, "provenance": getattr(model.config, "provenance", None),
                           "device_map": getattr(model, "hf_device_map", None), "ppl": {}}
    for source in [s for s in args.eval.split(",") if s and s != "none"]:
        samples = None if args.eval_samples == "all" else args.eval_samples
        windows = evaluation_windows(tokenizer, load_corpus(source), samples, args.eval_seqlen, max_pos)
        out["ppl"][source] = perplexity(model, windows, batch_size=args.batch_size, device=device,
                                        progress=not args.quiet).ppl
    if args.tasks and args.tasks != "none":
        from prunebench.harness.zeroshot import evaluate_zeroshot

        limit = None if args.limit == "all" else args.limit
        result = evaluate_zeroshot(model, tokenizer, tasks=args.tasks.split(","), limit=limit,
                                   batch_size=args.batch_size, max_length=min(args.max_length, max_pos))
        out["zeroshot"] = result.to_dict()
    summary = {"ppl": out["ppl"], "zeroshot_average": out.get("zeroshot", {}).get("average"),
               "device_map": out["device_map"], "provenance": out["provenance"]}
    print(json.dumps(summary, indent=1, default=str))
    if args.json:
        atomic_write_json(Path(args.json), json.loads(json.dumps(out, default=str)))
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from prunebench.harness.speed import check_pivots, render, speed_sweep, write_sweep

    check_pivots(args.pivot)
    if args.from_json:
        import json

        if not Path(args.from_json).is_file():
            raise UsageError(f"no such sweep file: {args.from_json}")
        rows = json.loads(Path(args.from_json).read_text())["rows"]
    else:
        if not args.models:
            raise UsageError("give saved model folders to time (prunebench run --save DIR), or --from-json to re-render")
        sweep = speed_sweep([Path(m) for m in args.models], base=args.base, profile=args.profile, device=args.device,
                            shapes_only=args.shapes_only, show_progress=not args.quiet)
        rows = sweep["rows"]
        if args.json:
            write_sweep(sweep, args.json)
    table = render(rows, args.pivot)
    print(table)
    if args.markdown:
        _write_text(args.markdown, table)
    if args.plot:
        from prunebench.harness.speed import plot

        plot(rows, Path(args.plot))
    return 0


def cmd_regression(args: argparse.Namespace) -> int:
    from prunebench.harness.manager import PluginHost
    from prunebench.harness.regression import case_methods, case_models, measure_noise, run_cases, write_noise

    methods = [m for m in args.methods.split(",") if m] if args.methods else None
    models = [m for m in args.models.split(",") if m] if args.models else None
    if args.noise_table:
        from prunebench.harness.regression import load_expected, noise_table

        print(noise_table(load_expected().get("noise", {}), tuple(models) if models else None))
        return 0
    if args.noise:
        settings = [s.strip() for s in args.settings.split(",") if s.strip()] if args.settings else None
        dtypes = tuple(d for d in args.dtypes.split(",") if d)
        report = measure_noise(methods or case_methods(PluginHost()), models or list(case_models()), settings, dtypes)
        noise = write_noise(report, "prunebench " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        for dtype in dtypes:
            worst = noise.get(dtype, {})
            if worst.get("worst_case"):
                print(f"{dtype}: largest relative spread {worst['max_relative_spread']:.2e} ({worst['worst_case']})")
        return 0
    failed = run_cases(methods=methods, models=models, write=args.write, out=print)
    return 1 if failed and not args.write else 0


def cmd_noise(args: argparse.Namespace) -> int:
    from prunebench.harness.noise import folder_name, measure, table
    from prunebench.harness.results import load_results
    from prunebench.harness.spec import parse_seeds

    groups: dict[str, list] = {}
    if args.table:
        for item in args.table:
            label, sep, folder = item.partition("=")
            if not sep:
                raise UsageError(f"--table expects LABEL=FOLDER (LABEL 'seeds' for the seed runs), got {item!r}")
            groups[label] = load_results([folder])[0]
    else:
        run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
        if not run_args:
            raise UsageError("give the run's own options after --, e.g. -- --method sobp-exact --sparsity 0.3")
        settings = [s.strip() for s in args.settings.split(",") if s.strip()] if args.settings else []
        results = Path(args.results)
        measure(run_args, parse_seeds(args.seeds), settings, results)
        groups["seeds"] = load_results([results / "seeds"])[0]
        for setting in settings:
            groups[setting] = load_results([results / folder_name(setting)])[0]
    text = table(groups)
    print(text)
    if args.markdown:
        _write_text(args.markdown, text)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from prunebench.harness.results import migrate

    done = migrate(args.paths, dry_run=args.dry_run)
    for path, what in done:
        print(f"{path}: {what}")
    print(f"{len(done)} file(s) {'would be ' if args.dry_run else ''}migrated")
    return 0


# ----- the parser --------------------------------------------------------------------------------
def _add_grid_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid")
    g.add_argument("--seeds", help="calibration seeds, e.g. 0,1,2 or 0-4: one result per (cell, seed)")
    g.add_argument("--shard", default="0/1", help="I/N: run every N-th grid cell starting at I")
    g.add_argument("--executor", default="local", help="local (this process) | ray | slurm")
    g.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    g.add_argument("--workers", type=int, default=2, help="parallel cells on a local Ray instance")
    g.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each cell declares (Ray / Slurm)")
    g.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs each cell declares (Ray / Slurm)")
    g.add_argument("--memory-gb-per-task", type=float, help="memory each cell declares (Ray / Slurm)")
    g.add_argument("--slurm-partition", help="Slurm partition (--executor slurm)")
    g.add_argument("--slurm-folder", default="runs/slurm", help="submitit's log and pickle folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunebench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="components, methods, metrics, models, architectures, data sources, profiles"
                   ).set_defaults(func=cmd_list)

    run = sub.add_parser("run", help="prune one model with one method at one sparsity")
    run.add_argument("--method", required=True, help="a method (recipe) from prunebench list")
    run.add_argument("--sparsity", type=float, help="fraction of decoder-layer parameters to remove, in [0, 1) "
                     "(omit only when a --set parameter sets the budget, e.g. transform.slicing)")
    run.add_argument("--save", help="save the pruned model (save_pretrained, with its provenance) into this folder")
    _add_protocol_args(run)
    run.set_defaults(func=cmd_run)

    cmp_ = sub.add_parser("compare", help="a grid of methods x sparsities x seeds under one protocol (resumable)")
    cmp_.add_argument("--methods", required=True, help="comma-separated methods")
    cmp_.add_argument("--sparsities", required=True, help="comma-separated, e.g. 0.2,0.3")
    cmp_.add_argument("--markdown", help="also write the markdown table (intervals, verdicts) here")
    _add_grid_args(cmp_)
    _add_protocol_args(cmp_)
    cmp_.set_defaults(func=cmd_compare)

    abl = sub.add_parser("ablate", help="a method's cumulative ablation rows (a paper's ablation table), resumable")
    abl.add_argument("--method", required=True, help="a method that declares ablation rows (e.g. intraslice)")
    abl.add_argument("--sparsity", "--sparsities", dest="sparsity", required=True, help="comma-separated, e.g. 0.2,0.3")
    abl.add_argument("--no-uniform", action="store_true",
                     help="leave out the row with the method's components at uniform ratios")
    abl.add_argument("--markdown", help="also write the ablation table here")
    abl.add_argument("--seeds", help="calibration seeds, e.g. 0,1,2")
    abl.add_argument("--shard", default="0/1", help="I/N: run every N-th cell starting at I (the table shows this shard's)")
    _add_protocol_args(abl)
    abl.set_defaults(func=cmd_ablate)

    att = sub.add_parser("attribute", help="which component kinds account for the gap between two methods (factorial grid)")
    att.add_argument("--methods", required=True, help="two methods A,B (e.g. intraslice,sobp)")
    att.add_argument("--sparsity", type=float, required=True, help="the sparsity to compare them at")
    att.add_argument("--markdown", help="where to write the effects table (default: under --results)")
    att.add_argument("--json", help="where to write the effects as JSON (default: next to the markdown)")
    _add_grid_args(att)
    _add_protocol_args(att)
    att.set_defaults(func=cmd_attribute)

    off = sub.add_parser("offload", help="prune a checkpoint on disk layer by layer (models larger than memory)")
    off.add_argument("--model", required=True, help="local checkpoint directory (safetensors, with its tokenizer)")
    off.add_argument("--method", required=True, help="a method whose components work one layer at a time")
    off.add_argument("--sparsity", type=float, required=True, help="fraction of decoder-layer parameters to remove")
    off.add_argument("--out", required=True, help="new directory for the pruned checkpoint")
    off.add_argument("--set", dest="overrides", action="append", default=[], metavar="KIND=NAME|KIND.PARAM=VALUE",
                     help="swap a component or set a parameter (repeatable)")
    off.add_argument("--calibration", default="wiki-offline", help="calibration data source")
    off.add_argument("--calibration-samples", type=int, default=16, help="calibration sequences")
    off.add_argument("--calibration-seqlen", type=int, default=256, help="calibration sequence length")
    off.add_argument("--eval", default="wiki-offline", help="perplexity source ('none' to skip)")
    off.add_argument("--eval-samples", type=int, default=8, help="perplexity windows")
    off.add_argument("--eval-seqlen", type=int, default=256, help="perplexity window length")
    off.add_argument("--batch-size", type=int, default=4, help="calibration and evaluation batch size")
    off.add_argument("--seed", type=int, default=0, help="calibration seed")
    off.add_argument("--dtype", default="float32", help="compute dtype of the layer being pruned")
    off.add_argument("--spill-activations", help="keep stored calibration activations on disk in bfloat16 | float16")
    off.add_argument("--results", help="also write the run's result (schema 2, kind offload) into this folder")
    off.add_argument("--json", help="also write the full result here")
    off.add_argument("--quiet", action="store_true", help="no progress output")
    off.set_defaults(func=cmd_offload)

    ev = sub.add_parser("eval", help="perplexity and zero-shot of a saved checkpoint, spread over devices and disk")
    ev.add_argument("--model", required=True, help="checkpoint directory (pruned or dense, with its tokenizer)")
    ev.add_argument("--device-map", default="auto", help="accelerate device map: auto | balanced | sequential | cpu")
    ev.add_argument("--max-memory", help="per-device limits, e.g. 0=70GiB,1=70GiB,cpu=100GiB")
    ev.add_argument("--offload-folder", help="where layers that fit nowhere else are memory-mapped")
    ev.add_argument("--eval", default="wiki-offline", help="comma-separated perplexity sources ('none' to skip)")
    ev.add_argument("--eval-samples", type=_int_or_all, default=8, help="perplexity windows per source, or 'all'")
    ev.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    ev.add_argument("--tasks", default="none", help="comma-separated zero-shot tasks")
    ev.add_argument("--limit", type=_int_or_all, help="zero-shot items per task, or 'all'")
    ev.add_argument("--max-length", type=int, default=2048, help="zero-shot context limit")
    ev.add_argument("--batch-size", type=int, default=4, help="batch size")
    ev.add_argument("--json", help="also write the full result here")
    ev.add_argument("--quiet", action="store_true", help="no progress output")
    ev.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="tables (intervals, verdicts) and plots from result files")
    rep.add_argument("paths", nargs="+", help="result files or folders")
    rep.add_argument("--markdown", help="write the markdown table to this file")
    rep.add_argument("--compact", action="store_true", help="the paper's compact Table-1 layout: method x sparsity")
    rep.add_argument("--plots", help="write PNG plots (with 95%% error bars) into this folder")
    rep.add_argument("--cost", help="write the pruning-cost table (time, ratio, peak memory) here")
    rep.add_argument("--cost-reference", default="slicegpt", help="method whose pruning time is 1 in the cost table")
    rep.add_argument("--sweep", metavar="FIELD",
                     help="one row per result against this dotted result field (e.g. "
                          "recipe.components.allocation.params.lambda_b), across protocols; --plots gets sweep.png")
    rep.set_defaults(func=cmd_report)

    spd = sub.add_parser("speed", help="time saved pruned models against dense in one process (an idle machine)")
    spd.add_argument("models", nargs="*", help="saved pruned model folders (prunebench run --save)")
    spd.add_argument("--from-json", help="re-render the tables and plot of an earlier --json, timing nothing")
    spd.add_argument("--pivot", action="append", default=[], help="add a method x sparsity table of this column")
    spd.add_argument("--base", help="the dense model they were pruned from (default: read from their provenance)")
    spd.add_argument("--profile", default="offline", help="whose timing settings to use")
    spd.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    spd.add_argument("--shapes-only", action="store_true", help="random weights from each config.json (latency needs shapes only)")
    spd.add_argument("--json", help="write every timing here")
    spd.add_argument("--markdown", help="write the tables here")
    spd.add_argument("--plot", help="write the latency plot here")
    spd.add_argument("--quiet", action="store_true", help="no progress output")
    spd.set_defaults(func=cmd_speed)

    reg = sub.add_parser("regression", help="the quality regression cases against their committed expectations")
    reg.add_argument("--write", action="store_true", help="record the measured values as the expectations")
    reg.add_argument("--methods", help="comma-separated (default: every method)")
    reg.add_argument("--models", help="comma-separated case models (default: all)")
    reg.add_argument("--noise", action="store_true",
                     help="measure how far the cases move across thread counts and kernel paths (float64 and float32) "
                          "and record it with the expectations (merged with earlier measurements)")
    reg.add_argument("--settings", help="with --noise: comma-separated settings (default: all): default (all "
                                        "cores, best kernels), 1-thread, other-kernels-1-thread (scalar ATen, MKL SSE4.2)")
    reg.add_argument("--dtypes", default="float64,float32", help="with --noise: comma-separated dtypes")
    reg.add_argument("--noise-table", action="store_true", help="print the recorded noise as a markdown table")
    reg.set_defaults(func=cmd_regression)

    noi = sub.add_parser("noise", help="how far one cell moves with the calibration seed, the thread count and the kernel path",
                         description="Runs `prunebench run <options after -->` for every seed and, at the first seed, under "
                                     "every setting (a child process each, its own cache), then tabulates the spreads.")
    noi.add_argument("--seeds", default="0,1,2", help="calibration seeds (default 0,1,2)")
    noi.add_argument("--settings", default="1 thread,2 threads,scalar kernels",
                     help="comma-separated: 1 thread, 2 threads, scalar kernels, avx2 kernels")
    noi.add_argument("--results", default=DEFAULT_RESULTS + "/noise", help="folder for the runs (one subfolder per setting)")
    noi.add_argument("--table", action="append", metavar="LABEL=FOLDER",
                     help="only tabulate existing runs (LABEL 'seeds' for the seed runs; repeatable)")
    noi.add_argument("--markdown", help="also write the table here")
    noi.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: the options of prunebench run")
    noi.set_defaults(func=cmd_noise)

    res = sub.add_parser("results", help="maintain result folders")
    res_sub = res.add_subparsers(dest="action", required=True)
    mig = res_sub.add_parser("migrate", help="rewrite older result files in the current schema, in place")
    mig.add_argument("paths", nargs="+", help="result files or folders")
    mig.add_argument("--dry-run", action="store_true", help="only say what would change")
    mig.set_defaults(func=cmd_results)
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
