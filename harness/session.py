"""The one place a run is built and recorded: spec -> model -> data -> prune -> metrics -> result.

``RunSession`` serves every kind of run: ``prunebench run`` / ``compare`` / ``ablate`` /
``attribute`` (one session per grid cell), ``offload`` (the inputs come from a checkpoint
on disk, one layer in memory at a time), the regression cases (tiny models with random
tokens) and the benchmarks. They differ only in their ``RunInputs`` (what the model and
the data are, where layers live, how the pruned model is saved); the stages, the result
schema (``harness.results``) and the identities (``harness.spec``) are the same.

Everything a user can get wrong is checked in ``validate`` before the first forward pass
(method, components, parameters, sparsity or a budget parameter, data sources, metrics,
sequence lengths), so bad input costs nothing and writes nothing. Dense metrics are
cached by everything that determines them, so a grid measures the dense model once.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunebench.harness import cache as cache_mod
from prunebench.harness.clock import peak_rss_mb
from prunebench.harness.component_cache import ids_digest
from prunebench.harness.context import LayerResidency, RunContext
from prunebench.harness.contracts import Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.metrics import Metric, MetricContext, metric_settings, select_metrics
from prunebench.harness.params import paper_count_sparsity, param_report
from prunebench.harness.profiles import Profile
from prunebench.harness.progress import step_reporter
from prunebench.harness.results import RunResult, SparsityRecord, environment, write_result
from prunebench.harness.runner import PruneOutcome, check_sparsity, prune
from prunebench.harness.spec import RunSpec, cell_of, protocol_id, protocol_of, result_name

DENSE_CACHE_VERSION = 1
"""Bump when a metric's computation changes, so old dense entries are never reused."""


@dataclass
class RunInputs:
    """What a run prunes and measures, built once per run.

    ``dense`` is the harness-format model that pruning edits in place; ``source_model`` the
    stock transformers model it was converted from (None when layers live on disk).
    ``cache_parts`` identify everything method-independent (model, data spec, seed), so a
    component's cache entry is shared across methods and sparsities. ``save`` writes the
    pruned model (with its tokenizer) to a folder and returns it.
    """

    dense: Any
    tokenizer: Any
    calibration: torch.Tensor
    windows: dict[str, torch.Tensor]
    model_fingerprint: str
    data_fingerprints: dict[str, str]
    cache_parts: dict[str, Any]
    source_model: Any = None
    residency: LayerResidency = field(default_factory=LayerResidency)
    save: Callable[[Any, str], Path] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calibration_text: Any = None  # the calibration corpus, for held-out tuning (harness.tuning)

    @classmethod
    def from_model(cls, source: Any, calibration: torch.Tensor, windows: dict[str, torch.Tensor], fingerprint: str,
                   tokenizer: Any = None, host: PluginHost | None = None) -> RunInputs:
        """Inputs from a model in memory and token ids (tests, regression cases, benchmarks
        on synthetic models): converted once; nothing cached across runs (no cache parts)."""
        from prunebench.harness.adapters import to_pruned

        return cls(dense=to_pruned(source, host), tokenizer=tokenizer, calibration=calibration, windows=windows,
                   model_fingerprint=fingerprint, data_fingerprints={}, cache_parts={}, source_model=source,
                   device=next(source.parameters()).device)


InputsFactory = Callable[[RunSpec, Profile, PluginHost], RunInputs]
"""Builds a run's inputs from its spec, resolved profile and plugin host (whose adapters convert the model)."""


def load_inputs(spec: RunSpec, profile: Profile, host: PluginHost | None = None) -> RunInputs:
    """The default inputs: a named model, local checkpoint, GGUF file or hub id loaded in
    memory and converted once; calibration and evaluation windows from the profile's sources."""
    from prunebench.harness.adapters import to_pruned
    from prunebench.harness.data import calibration_batch, evaluation_windows, load_corpus
    from prunebench.harness.models import load_source_model

    source = load_source_model(spec.model, device=spec.device, dtype=spec.dtype)
    tokenizer, max_pos = source.tokenizer, source.model.config.max_position_embeddings
    dense = to_pruned(source.model, host)
    calib_corpus = load_corpus(profile.calibration_source)
    calibration = calibration_batch(tokenizer, calib_corpus, profile.calibration_samples, profile.calibration_seqlen,
                                    spec.seed, max_pos)
    corpora = {s: load_corpus(s) for s in profile.eval_sources}
    windows = {s: evaluation_windows(tokenizer, c, profile.eval_samples, profile.eval_seqlen, max_pos)
               for s, c in corpora.items()}

    def save(model: Any, folder: str) -> Path:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return Path(folder)

    return RunInputs(
        dense=dense, tokenizer=tokenizer, calibration=calibration, windows=windows,
        model_fingerprint=source.fingerprint,
        data_fingerprints={"calibration": calib_corpus.fingerprint[:16], **{s: c.fingerprint[:16] for s, c in corpora.items()}},
        cache_parts={"model": source.fingerprint, "dtype": spec.dtype, "data": calib_corpus.fingerprint,
                     "samples": profile.calibration_samples, "seqlen": profile.calibration_seqlen, "seed": spec.seed},
        source_model=source.model, save=save, device=torch.device(spec.device), calibration_text=calib_corpus,
    )


def budget_setters(recipe: Recipe, host: PluginHost) -> list[str]:
    """``KIND.PARAM=VALUE`` of every budget-setting parameter the recipe sets (not None)."""
    out = []
    for kind, ref in recipe.components.items():
        for param in host.component(kind, ref.name).budget_params:
            if ref.params.get(param) is not None:
                out.append(f"{kind}.{param}={ref.params[param]}")
    return out


class RunSession:
    """One run, in stages; ``run()`` does them all and returns the typed result."""

    def __init__(self, spec: RunSpec, host: PluginHost | None = None, show_progress: bool = True,
                 inputs: InputsFactory | None = None, kind: str = "run") -> None:
        self.spec = spec
        self.host = host or PluginHost()
        self.show_progress = show_progress
        self.inputs_factory = inputs or load_inputs
        self.kind = kind
        self.validate()

    # ----- before any compute ------------------------------------------------------------
    def validate(self) -> None:
        """Resolve and check everything; sets profile, recipe, metrics, protocol and cell."""
        from prunebench.harness.data import list_sources
        from prunebench.harness.tuning import check_tune

        spec, host = self.spec, self.host
        self.recipe = host.resolve(spec.method, spec.overrides)
        self.set_by = budget_setters(self.recipe, host)
        if self.set_by and spec.sparsity is not None:
            raise UsageError(
                f"{', '.join(self.set_by)} sets how much is removed; a target sparsity ({spec.sparsity}) would "
                "disagree with it: drop --sparsity (the result records the achieved sparsity), or the parameter"
            )
        if not self.set_by:
            if spec.sparsity is None:
                raise UsageError("a target sparsity is needed (--sparsity); no component parameter sets the budget")
            check_sparsity(spec.sparsity)
        self.profile = spec.resolved_profile()
        from prunebench.harness.models import parse_dtype

        parse_dtype(spec.dtype)
        if self.inputs_factory is load_inputs:
            sources = list_sources()
            for source in (self.profile.calibration_source, *self.profile.eval_sources):
                if source not in sources and not source.startswith("text:"):
                    raise UsageError(f"unknown data source {source!r}; valid sources: {', '.join(sources)}, text:PATH")
            from prunebench.harness.models import check_model_name

            check_model_name(spec.model)
        self.metrics: list[Metric] = select_metrics(self.host.metrics, spec, self.profile, offloaded=self.kind == "offload")
        check_tune(spec.tune, self.recipe, host)
        if spec.tune and self.kind == "offload":
            raise UsageError("--tune prunes one copy of the model per candidate: not with layers on disk")
        self.protocol = protocol_of(spec, self.profile, metric_settings(self.metrics, spec, self.profile))
        self.protocol_id = protocol_id(self.protocol)
        self.cell = cell_of(self.protocol, self.recipe.to_dict(), spec.sparsity, spec.seed, spec.tune)
        self.file_name = result_name(spec, self.recipe.name, self.cell)  # fixed before tuning picks a value

    def result_path(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / self.file_name

    @property
    def target(self) -> float:
        """What the runner prunes to: the spec's target, or 0 when a parameter sets the budget."""
        return 0.0 if self.spec.sparsity is None else float(self.spec.sparsity)

    # ----- metrics ------------------------------------------------------------------------
    def _context(self, phase: str, model: Any, inputs: RunInputs, dense: dict[str, Any]) -> MetricContext:
        return MetricContext(
            phase=phase, spec=self.spec, profile=self.profile, model=model, tokenizer=inputs.tokenizer,
            windows=inputs.windows, device=inputs.device, source_model=inputs.source_model,
            residency=inputs.residency, dense=dense, model_fingerprint=inputs.model_fingerprint,
            show_progress=self.show_progress,
        )

    def _dense_cache_key(self, metric: Metric, ctx: MetricContext) -> str:
        return cache_mod.stable_key(
            "dense-metric", DENSE_CACHE_VERSION, metric.name, metric.settings(self.spec, self.profile),
            ctx.model_fingerprint, self.spec.dtype, self.protocol["device_type"], metric.dense_cache_parts(ctx),
        )

    def measure(self, phase: str, model: Any, inputs: RunInputs, dense: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every selected metric of ``phase`` on ``model``; dense values from the cache when
        a metric allows it."""
        out: dict[str, Any] = {}
        for metric in self.metrics:
            if phase not in metric.phases:
                continue
            ctx = self._context(phase, model, inputs, dense or {})
            path = None
            if phase == "dense" and metric.dense_cached and inputs.model_fingerprint:
                path = cache_mod.cache_root() / "dense" / f"{self._dense_cache_key(metric, ctx)}.json"
                cached = cache_mod.read_json(path) if self.spec.use_cache else None
                if isinstance(cached, dict) and set(metric.keys) <= set(cached):
                    out.update(cached)
                    continue
            values = metric.measure(ctx)
            unexpected = set(values) - set(metric.keys)
            if unexpected:
                raise ValueError(f"metric {metric.name!r} wrote keys it does not own: {sorted(unexpected)}")
            values = json.loads(json.dumps(values, default=_jsonable))
            if path is not None:
                cache_mod.atomic_write_json(path, values)
            out.update(values)
        return out

    # ----- pruning ------------------------------------------------------------------------
    def run_context(self, inputs: RunInputs, model: Any, calibration: torch.Tensor | None = None) -> RunContext:
        """The run as components see it; ``calibration`` replaces the inputs' calibration
        ids (held-out tuning prunes on part of them), and then keys every cache too."""
        torch.manual_seed(self.spec.seed)
        calibration = inputs.calibration if calibration is None else calibration
        parts = dict(inputs.cache_parts)
        if calibration is not inputs.calibration:
            parts["calibration_ids"] = ids_digest(calibration)
        return RunContext(
            model=model, calibration=calibration, batch_size=self.profile.batch_size, device=inputs.device,
            seed=self.spec.seed, target=self.target, cache_parts=parts, use_cache=self.spec.use_cache,
            residency=inputs.residency, progress=step_reporter(self.show_progress),
        )

    def prune(self, inputs: RunInputs) -> tuple[Any, PruneOutcome, dict[str, Any] | None]:
        """Prune ``inputs.dense`` (in place); with ``spec.tune``, pick the tuned values on
        held-out calibration text first. Returns the model, the outcome and the tuning record."""
        if self.spec.tune:
            from prunebench.harness.tuning import tune_and_prune

            return tune_and_prune(self, inputs)
        run = self.run_context(inputs, inputs.dense)
        outcome = prune(run, self.recipe, self.host, show_progress=self.show_progress)
        return run.model, outcome, None

    # ----- the whole run ----------------------------------------------------------------------
    def run(self, results_dir: str | Path | None = None) -> RunResult:
        """Run every stage; write the result JSON atomically into ``results_dir`` when given."""
        spec = self.spec
        t0 = time.perf_counter()
        env = environment(spec.device)  # at the start: the code that runs, not HEAD when it ends
        stages: dict[str, float] = {}
        memory: dict[str, float] = {}

        start = time.perf_counter()
        inputs = self.inputs_factory(spec, self.profile, self.host)
        stages["load"] = time.perf_counter() - start
        memory["load"] = peak_rss_mb()

        start = time.perf_counter()
        dense_metrics = self.measure("dense", inputs.dense, inputs)
        stages["dense_evaluation"] = time.perf_counter() - start
        dense_counts = param_report(inputs.dense, inputs.dense)["dense"]
        paper_reference = _shape_copy(inputs.dense)

        start = time.perf_counter()
        model, outcome, tuning = self.prune(inputs)
        stages.update({f"prune.{k}": v for k, v in outcome.stage_seconds.items()})
        stages["prune"] = sum(outcome.stage_seconds.get(k, 0.0) for k in ("transform", "importance", "allocation", "layer_loop"))
        memory["prune"] = peak_rss_mb()

        start = time.perf_counter()
        pruned_metrics = self.measure("pruned", model, inputs, dense=dense_metrics)
        stages["evaluation"] = time.perf_counter() - start
        memory["evaluation"] = peak_rss_mb()

        params = param_report(dense_counts, model)
        sparsity = SparsityRecord(
            target=spec.sparsity, achieved=params["achieved_sparsity"],
            set_by=", ".join(self.set_by) if self.set_by else "target", spent=outcome.spent,
            allocation_target=outcome.allocation_target,
            paper_count=paper_count_sparsity(paper_reference, model),
        )
        provenance = self.provenance(sparsity)
        saved = None
        if spec.save_dir:
            if inputs.save is None:
                raise UsageError("these inputs cannot save the pruned model")
            model.config.provenance = provenance
            saved = str(inputs.save(model, spec.save_dir))
        stages["total"] = time.perf_counter() - t0
        result = RunResult(
            kind=self.kind, cell=self.cell,
            spec={**spec.to_dict(), "method": self.host.recipe(spec.method).name, "protocol": self.protocol,
                  "protocol_id": self.protocol_id, "model_fingerprint": inputs.model_fingerprint,
                  "data": inputs.data_fingerprints, "saved_to": saved},
            recipe=self.recipe.to_dict() | {"name": self.recipe.name},
            sparsity=sparsity,
            params={"dense": params["dense"], "pruned": params["pruned"]},
            metrics={"dense": dense_metrics, "pruned": pruned_metrics},
            timings={"stages_s": stages},
            memory={"peak_rss_mb": peak_rss_mb(), "peak_rss_after_prune_mb": memory["prune"], "by_stage": memory},
            pruning={"allocation": {"attention": outcome.allocation.attention, "mlp": outcome.allocation.mlp,
                                    "meta": outcome.allocation.meta},
                     "transform": outcome.transform, "importance": outcome.importance_meta, "layers": outcome.layers},
            tuning=tuning, environment=env,
        )
        result = RunResult.from_dict(json.loads(json.dumps(result.to_dict(), default=_jsonable)))
        if results_dir is not None:
            result.path = str(write_result(self.result_path(results_dir), result))
        self.model = model
        return result

    def provenance(self, sparsity: SparsityRecord) -> dict[str, Any]:
        """What a saved pruned model records about how it was made (its config's ``provenance``)."""
        from prunebench import __version__
        from prunebench.harness.results import git_commit

        return {
            "prunebench": __version__, "git_commit": git_commit(), "method": self.recipe.name,
            "recipe": self.recipe.to_dict(), "target": sparsity.target, "achieved": sparsity.achieved,
            "set_by": sparsity.set_by, "protocol": self.protocol, "protocol_id": self.protocol_id, "cell": self.cell,
            "seed": self.spec.seed, "source_model": self.spec.model,
        }


def _shape_copy(model: Any) -> Any:
    """A parameter-free stand-in of the dense model's layer shapes (for the paper-count
    sparsity after the real model was pruned in place)."""
    from prunebench.harness.pruned_model import PrunedForCausalLM

    with torch.device("meta"):
        return PrunedForCausalLM(copy.deepcopy(model.config))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def run_experiment(spec: RunSpec, results_dir: str | Path | None = None, host: PluginHost | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Run one spec in memory; the result as a dict (with ``path`` when written)."""
    return RunSession(spec, host=host, show_progress=show_progress).run(results_dir).to_dict()
