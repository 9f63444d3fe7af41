"""The built-in metrics: perplexity, zero-shot accuracy, timing, KV-cache size.

Registered through the ``prunebench`` entry-point group (``core-metrics``) exactly like a
third-party metric would be (``harness.metrics`` has the contract).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.metrics import Measure, Metric, MetricContext
from prunebench.harness.perplexity import PerplexityResult, perplexity, result_from_windows, window_nll
from prunebench.harness.profiles import Profile
from prunebench.harness.spec import RunSpec

TASK_SHORT = {"arc_challenge": "ARC-c", "arc_easy": "ARC-e", "winogrande": "WinoG", "boolq": "BoolQ",
              "hellaswag": "HellaS", "openbookqa": "OBQA", "piqa": "PIQA"}
"""Column headers of the paper's seven tasks (a task without one shows its own name)."""

DRIFT_LIMIT = 0.05
"""A dense model timed twice in one run that moves by more than this flags the ratios."""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ----- perplexity ------------------------------------------------------------------------------
@torch.no_grad()
def streamed_perplexity(model: Any, residency: Any, windows: torch.Tensor, batch_size: int) -> PerplexityResult:
    """Perplexity with one decoder layer real at a time: all windows pass layer 0, then
    layer 1, ... (``harness.offload``); the same definition and per-window NLLs as
    ``harness.perplexity.perplexity``."""
    from prunebench.harness.context import embed, run_layer

    device = model.lm_head.weight.device
    hidden = embed(model, windows, batch_size, device)
    for index in range(len(model.model.layers)):
        with residency.use(model, index) as layer:
            hidden = run_layer(layer, model, hidden, batch_size)
    per_window: list[float] = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model.lm_head(model.model.norm(hidden[start : start + batch_size]))
        per_window.extend(window_nll(logits, ids).cpu().tolist())
    return result_from_windows(per_window, windows.shape[1] - 1)


class PerplexityMetric(Metric):
    """Perplexity per evaluation source: exp(summed NLL / predicted tokens) over fixed windows."""

    name = "ppl"
    keys = ("ppl", "ppl_windows")
    dense_cached = True
    supports_offload = True

    def settings(self, spec: RunSpec, profile: Profile) -> dict[str, Any]:
        return {"sources": list(profile.eval_sources), "samples": profile.eval_samples, "seqlen": profile.eval_seqlen}

    def dense_cache_parts(self, ctx: MetricContext) -> Any:
        return {s: (tuple(w.shape), _digest(w)) for s, w in ctx.windows.items()}

    def measure(self, ctx: MetricContext) -> dict[str, Any]:
        ppl, windows = {}, {}
        for source, win in ctx.windows.items():
            if ctx.residency is not None and ctx.residency.offloaded:
                result = streamed_perplexity(ctx.model, ctx.residency, win, ctx.profile.batch_size)
            else:
                result = perplexity(ctx.model, win, batch_size=ctx.profile.batch_size, progress=ctx.show_progress)
            ppl[source], windows[source] = result.ppl, list(result.window_nll)
        return {"ppl": ppl, "ppl_windows": windows}

    def measures(self, block: dict[str, Any], result: dict[str, Any]) -> list[Measure]:
        out = []
        seqlen = (((result.get("spec") or {}).get("protocol") or {}).get("metrics") or {}).get("ppl", {}).get("seqlen")
        for source in sorted(block.get("ppl") or {}):
            nll = (block.get("ppl_windows") or {}).get(source)
            units = tuple(x / (seqlen - 1) for x in nll) if nll and seqlen else None
            out.append(Measure(f"ppl:{source}", f"PPL {source}", block["ppl"][source], better="lower",
                               units=units, display="exp", headline=True))
        return out


# ----- zero-shot -------------------------------------------------------------------------------
class ZeroShotMetric(Metric):
    """Zero-shot accuracy on lm-eval's tasks (offline copies of the paper's seven), with lm-eval's standard errors."""

    name = "zeroshot"
    keys = ("zeroshot",)
    dense_cached = True

    def _max_length(self, profile: Profile, max_positions: int | None = None) -> int:
        return profile.task_max_length if max_positions is None else min(profile.task_max_length, max_positions)

    def settings(self, spec: RunSpec, profile: Profile) -> dict[str, Any]:
        return {"tasks": list(profile.tasks), "limit": profile.task_limit, "batch_size": profile.task_batch_size,
                "max_length": profile.task_max_length}

    def check(self, spec: RunSpec, profile: Profile) -> None:
        from prunebench.harness.zeroshot import check_args

        check_args(list(profile.tasks), profile.task_limit, profile.task_batch_size, profile.task_max_length)

    def dense_cache_parts(self, ctx: MetricContext) -> Any:
        from importlib.metadata import version

        return {"max_length": self._max_length(ctx.profile, ctx.model.config.max_position_embeddings),
                "seed": ctx.spec.seed, "lm_eval": version("lm-eval")}

    def measure(self, ctx: MetricContext) -> dict[str, Any]:
        from prunebench.harness.zeroshot import evaluate_zeroshot

        result = evaluate_zeroshot(
            ctx.model, ctx.tokenizer, tasks=list(ctx.profile.tasks), limit=ctx.profile.task_limit,
            batch_size=ctx.profile.task_batch_size,
            max_length=self._max_length(ctx.profile, ctx.model.config.max_position_embeddings), seed=ctx.spec.seed,
        )
        return {"zeroshot": result.to_dict()}

    def measures(self, block: dict[str, Any], result: dict[str, Any]) -> list[Measure]:
        zs = block.get("zeroshot")
        if not zs:
            return []
        out = []
        tasks = zs.get("tasks") or {}
        errors = []
        for name, score in (zs.get("scores") or {}).items():
            stderr = (tasks.get(name) or {}).get("stderr")
            errors.append(stderr)
            out.append(Measure(f"zeroshot:{name}", TASK_SHORT.get(name, name), score, better="higher", stderr=stderr))
        average_se = None
        if errors and all(e is not None for e in errors):
            average_se = math.sqrt(sum(e * e for e in errors)) / len(errors)  # independent tasks
        out.append(Measure("zeroshot:average", "avg acc", zs.get("average"), better="higher", stderr=average_se,
                           headline=True))
        return out


# ----- timing ----------------------------------------------------------------------------------
class TimingMetric(Metric):
    """Prefill, decode and one-decoder-layer latency against the dense model, timed in the same process (load recorded)."""

    name = "timing"
    keys = ("timing",)
    phases = ("pruned",)

    def settings(self, spec: RunSpec, profile: Profile) -> dict[str, Any]:
        return dict(profile.timing)

    def measure(self, ctx: MetricContext) -> dict[str, Any]:
        from prunebench.harness.cpu_load import watch_load
        from prunebench.harness.timing import measure_against_dense, time_model

        if ctx.source_model is None:
            raise ValueError("timing needs the dense source model in memory")
        settings = ctx.profile.timing
        common = {k: settings[k] for k in ("batch", "seqlen", "decode_tokens", "kv_len", "warmup", "repeats")}
        source = ctx.source_model
        with watch_load() as load:
            before = time_model(source, vocab_size=source.config.vocab_size, device=ctx.device, **common)
            timing = measure_against_dense(source, ctx.model, settings, ctx.device, dense=before)
            after = time_model(source, vocab_size=source.config.vocab_size, device=ctx.device, **common)
        drift = max(abs(after[k] / before[k] - 1.0) for k in ("prefill_s", "decode_s_per_token") if before.get(k))
        reading = load[0]
        reasons = (["load"] if reading.busy else []) + (["dense drift"] if drift > DRIFT_LIMIT else [])
        timing["conditions"] = {"load": reading.to_dict(), "dense_drift": drift, "dense_after": after,
                                "flagged": bool(reasons), "reasons": reasons}
        return {"timing": timing}

    def measures(self, block: dict[str, Any], result: dict[str, Any]) -> list[Measure]:
        timing = block.get("timing")
        if not timing:
            return []
        conditions = timing.get("conditions") or {}
        flag = ", ".join(conditions.get("reasons") or []) or None
        ratios = timing.get("ratios") or {}
        layer = (timing.get("layer") or {}).get("ratios") or {}
        return [
            Measure("timing:prefill", "prefill x", ratios.get("prefill_speedup"), better="higher", flag=flag),
            Measure("timing:decode", "decode x", ratios.get("decode_speedup"), better="higher", flag=flag),
            Measure("timing:layer_prefill", "layer prefill x", layer.get("layer_prefill_speedup"), better="higher", flag=flag),
            Measure("timing:layer_decode", "layer decode x", layer.get("layer_decode_speedup"), better="higher", flag=flag),
        ]


# ----- KV cache ----------------------------------------------------------------------------------
def kv_cache_bytes_per_token(model: Any) -> int:
    """Bytes the KV cache holds per token: k and v rows of every layer's KV heads, in the
    model's dtype."""
    from prunebench.harness.params import kv_cache_width

    weight = model.model.embed_tokens.weight
    return kv_cache_width(model) * weight.element_size()


class KVCacheMetric(Metric):
    """KV-cache bytes per token (k and v of every layer's kept KV heads), read off the model."""

    name = "kv-cache"
    keys = ("kv_cache",)
    supports_offload = True

    def measure(self, ctx: MetricContext) -> dict[str, Any]:
        per_token = kv_cache_bytes_per_token(ctx.model)
        out: dict[str, Any] = {"bytes_per_token": per_token}
        dense = (ctx.dense.get("kv_cache") or {}).get("bytes_per_token")
        if dense:
            out["ratio"] = per_token / dense
        return {"kv_cache": out}

    def measures(self, block: dict[str, Any], result: dict[str, Any]) -> list[Measure]:
        kv = block.get("kv_cache")
        if not kv or "ratio" not in kv:
            return []
        return [Measure("kv_cache:ratio", "KV x", kv["ratio"], better="lower")]


@hookimpl
def prunebench_metrics() -> list[Metric]:
    return [PerplexityMetric(), ZeroShotMetric(), TimingMetric(), KVCacheMetric()]
