"""One run end to end: spec -> model -> data -> dense metrics -> prune -> metrics -> result.

Everything a user can get wrong is checked before the first forward pass (method,
components, parameters, sparsity, data sources, tasks, sequence lengths), so bad input
costs nothing and writes nothing. Dense metrics are cached by everything that determines
them, so a grid evaluates the dense model once.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunebench.harness import cache as cache_mod
from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import RunContext
from prunebench.harness.data import calibration_batch, evaluation_windows, list_sources, load_corpus
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import param_report
from prunebench.harness.perplexity import perplexity
from prunebench.harness.profiles import Profile, get_profile, with_overrides
from prunebench.harness.results import environment, peak_rss_mb, write_result
from prunebench.harness.runner import check_sparsity, prune

RESULT_SCHEMA = 1


@dataclass
class RunSpec:
    """Everything that defines one run. ``profile_overrides`` are Profile fields."""

    model: str = "smollm2-135m"
    method: str = "wanda-sp"
    sparsity: float = 0.2
    overrides: list[str] = field(default_factory=list)
    profile: str = "offline"
    profile_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    zeroshot: bool = True
    timing: bool = True
    save_dir: str | None = None
    use_cache: bool = True

    def resolved_profile(self) -> Profile:
        return with_overrides(get_profile(self.profile), **self.profile_overrides)


def protocol_of(spec: RunSpec, profile: Profile) -> dict[str, Any]:
    """What must be equal for two results to be compared (method and sparsity excluded)."""
    return {
        "model": spec.model, "dtype": spec.dtype, "seed": spec.seed, "profile": profile.to_dict(),
        "zeroshot": spec.zeroshot, "timing": spec.timing, "device_type": torch.device(spec.device).type,
    }


def protocol_id(protocol: dict[str, Any]) -> str:
    return cache_mod.stable_key(protocol)[:12]


def validate(spec: RunSpec, host: PluginHost) -> tuple[Profile, Any]:
    """Reject bad input before any compute; returns the profile and resolved recipe."""
    check_sparsity(spec.sparsity)
    recipe = host.resolve(spec.method, spec.overrides)
    profile = spec.resolved_profile()
    sources = list_sources()
    for source in (profile.calibration_source, *profile.eval_sources):
        if source not in sources and not source.startswith("text:"):
            raise UsageError(f"unknown data source {source!r}; valid sources: {', '.join(sources)}, text:PATH")
    if spec.zeroshot and profile.tasks:
        from prunebench.harness.zeroshot import check_args as check_zeroshot_args

        check_zeroshot_args(list(profile.tasks), profile.task_limit, profile.task_batch_size, profile.task_max_length)
    from prunebench.harness.models import check_model_name

    check_model_name(spec.model)
    return profile, recipe


def dense_metrics_key(spec: RunSpec, profile: Profile, fingerprint: str, windows: dict[str, torch.Tensor],
                      max_positions: int) -> str:
    """Cache key of the dense model's metrics: everything that can change them (the model,
    dtype and device type, the perplexity windows, and every zero-shot setting)."""
    zeroshot = None
    if spec.zeroshot and profile.tasks:
        zeroshot = {
            "tasks": list(profile.tasks), "limit": profile.task_limit, "batch_size": profile.task_batch_size,
            "max_length": min(profile.task_max_length, max_positions), "seed": spec.seed,
            "lm_eval": _lm_eval_version(),
        }
    return cache_mod.stable_key(
        "dense-metrics", 3, fingerprint, spec.dtype, torch.device(spec.device).type,
        {s: (tuple(w.shape), _tensor_digest(w)) for s, w in windows.items()}, zeroshot,
    )


def _dense_metrics(spec, profile, source, tokenizer, dense_model, windows, fingerprint, show) -> dict[str, Any]:
    """Perplexity (and zero-shot) of the dense model, cached by what determines them."""
    key = dense_metrics_key(spec, profile, fingerprint, windows, dense_model.config.max_position_embeddings)
    path = cache_mod.cache_root() / "dense" / f"{key}.json"
    cached = cache_mod.read_json(path) if spec.use_cache else None
    if cached is not None:
        return cached
    metrics = _evaluate(spec, profile, dense_model, tokenizer, windows, show)
    cache_mod.atomic_write_json(path, metrics)
    return metrics


def _evaluate(spec, profile, model, tokenizer, windows, show) -> dict[str, Any]:
    metrics: dict[str, Any] = {"ppl": {}, "ppl_windows": {}}
    for source, win in windows.items():
        result = perplexity(model, win, batch_size=profile.batch_size, progress=show)
        metrics["ppl"][source] = result.ppl
        metrics["ppl_windows"][source] = list(result.window_nll)
    if spec.zeroshot and profile.tasks:
        from prunebench.harness.zeroshot import evaluate_zeroshot

        result = evaluate_zeroshot(
            model, tokenizer, tasks=list(profile.tasks), limit=profile.task_limit,
            batch_size=profile.task_batch_size, max_length=min(profile.task_max_length, model.config.max_position_embeddings),
            seed=spec.seed,
        )
        metrics["zeroshot"] = result.to_dict()
    return metrics


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _timing(spec, profile, source_model, pruned_model) -> dict[str, Any]:
    from prunebench.harness.timing import measure_against_dense

    return measure_against_dense(source_model, pruned_model, profile.timing, torch.device(spec.device))


def result_path(results_dir: str | Path, spec: RunSpec, recipe_name: str, protocol: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", recipe_name)
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.model)[-40:]
    return Path(results_dir) / f"{model}__{slug}__s{spec.sparsity:.2f}__seed{spec.seed}__{protocol}.json"


def run_experiment(
    spec: RunSpec,
    results_dir: str | Path | None = None,
    host: PluginHost | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run one spec; write its result JSON atomically into ``results_dir`` when given."""
    from prunebench.harness.models import load_source_model

    t0 = time.perf_counter()
    env = environment(spec.device)  # at the start: the code that runs, not HEAD when it ends
    host = host or PluginHost()
    profile, recipe = validate(spec, host)
    protocol = protocol_of(spec, profile)
    stages: dict[str, float] = {}

    start = time.perf_counter()
    source = load_source_model(spec.model, device=spec.device, dtype=spec.dtype)
    tokenizer, max_pos = source.tokenizer, source.model.config.max_position_embeddings
    dense_model = to_pruned(source.model)
    stages["load_model"] = time.perf_counter() - start

    start = time.perf_counter()
    calib_corpus = load_corpus(profile.calibration_source)
    calibration = calibration_batch(
        tokenizer, calib_corpus, profile.calibration_samples, profile.calibration_seqlen, spec.seed, max_pos
    )
    windows = {
        s: evaluation_windows(tokenizer, load_corpus(s), profile.eval_samples, profile.eval_seqlen, max_pos)
        for s in profile.eval_sources
    }
    stages["data"] = time.perf_counter() - start

    start = time.perf_counter()
    dense_metrics = _dense_metrics(spec, profile, source, tokenizer, dense_model, windows, source.fingerprint, show_progress)
    stages["dense_evaluation"] = time.perf_counter() - start

    dense_counts = param_report(dense_model, dense_model)["dense"]
    torch.manual_seed(spec.seed)
    run = RunContext(
        model=dense_model, calibration=calibration, batch_size=profile.batch_size, device=torch.device(spec.device),
        seed=spec.seed, target=spec.sparsity,
        cache_parts={
            "model": source.fingerprint, "dtype": spec.dtype, "data": calib_corpus.fingerprint,
            "samples": profile.calibration_samples, "seqlen": profile.calibration_seqlen, "seed": spec.seed,
        },
        use_cache=spec.use_cache,
    )
    outcome = prune(run, recipe, host, show_progress=show_progress)
    pruned = run.model
    stages.update({f"prune.{k}": v for k, v in outcome.stage_seconds.items()})
    stages["prune"] = sum(outcome.stage_seconds.get(k, 0.0) for k in ("transform", "importance", "allocation", "layer_loop"))
    peak_after_prune = peak_rss_mb()

    start = time.perf_counter()
    pruned_metrics = _evaluate(spec, profile, pruned, tokenizer, windows, show_progress)
    stages["evaluation"] = time.perf_counter() - start

    timings_inference = None
    if spec.timing:
        start = time.perf_counter()
        timings_inference = _timing(spec, profile, source.model, pruned)
        stages["timing"] = time.perf_counter() - start

    params = param_report(dense_counts, pruned)
    if spec.save_dir:
        pruned.save_pretrained(spec.save_dir)
        tokenizer.save_pretrained(spec.save_dir)
    stages["total"] = time.perf_counter() - t0
    result = {
        "schema": RESULT_SCHEMA,
        "spec": {**asdict(spec), "protocol": protocol, "protocol_id": protocol_id(protocol),
                 "model_fingerprint": source.fingerprint,
                 "data": {"calibration": calib_corpus.fingerprint[:16],
                          **{s: load_corpus(s).fingerprint[:16] for s in profile.eval_sources}}},
        "recipe": recipe.to_dict() | {"name": recipe.name},
        "sparsity": {"target": spec.sparsity, "achieved": params["achieved_sparsity"]},
        "params": {"dense": params["dense"], "pruned": params["pruned"]},
        "metrics": {"dense": dense_metrics, "pruned": pruned_metrics},
        "timings": {"stages_s": stages, "inference": timings_inference},
        "memory": {"peak_rss_mb": peak_rss_mb(), "peak_rss_after_prune_mb": peak_after_prune},
        "pruning": {"allocation": {"attention": outcome.allocation.attention, "mlp": outcome.allocation.mlp,
                                   "meta": outcome.allocation.meta},
                    "transform": outcome.transform, "importance": outcome.importance_meta,
                    "layers": outcome.layers},
        "environment": env,
    }
    result = json.loads(json.dumps(result, default=_jsonable))
    if results_dir is not None:
        result["path"] = str(write_result(result_path(results_dir, spec, recipe.name, protocol_id(protocol)), result))
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
