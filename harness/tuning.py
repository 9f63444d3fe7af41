"""Picking a knob by held-out calibration text, never by the evaluation corpora.

Some component parameters decide a method's quality and have no rule in their paper
(IntraSlice's lambda_b, the FFN share of the budget; SoBP's per-layer floor). Choosing
them by the test perplexity would leak the test text into the method. ``RunSpec.tune``
(``--tune KIND.PARAM=V1,V2,...``) instead: the calibration text is cut in two, pruning
calibrates on windows drawn from the first part only, and every candidate (the cartesian
product when several parameters are tuned) is pruned and scored by perplexity on
non-overlapping windows of the held-out last part; the best candidate's model is the
run's model, and the result records every candidate's held-out perplexity (``tuning``).

Cost: one pruning per candidate (importance passes are cached and shared across them).
"""

from __future__ import annotations

import copy
import itertools
import json
from typing import TYPE_CHECKING, Any

import torch

from prunebench.harness.contracts import COMPONENT_KINDS, Recipe
from prunebench.harness.errors import NotEnoughDataError, UsageError
from prunebench.harness.perplexity import perplexity
from prunebench.harness.runner import PruneOutcome, prune

if TYPE_CHECKING:
    from prunebench.harness.manager import PluginHost
    from prunebench.harness.session import RunInputs, RunSession

HELD_OUT_FRACTION = 0.1
"""Share of the calibration text's tokens held out for scoring candidates."""
HELD_OUT_WINDOWS = 16
"""Held-out windows (of the calibration sequence length) each candidate is scored on."""


def check_tune(tune: dict[str, list[Any]], recipe: Recipe, host: PluginHost) -> None:
    """Refuse a tune request that names no real parameter, or has fewer than two values."""
    for key, values in (tune or {}).items():
        kind, _, param = key.partition(".")
        if kind not in COMPONENT_KINDS or not param:
            raise UsageError(f"--tune expects KIND.PARAM=V1,V2,... with KIND one of {', '.join(COMPONENT_KINDS)}, got {key!r}")
        component = host.component(kind, recipe.components[kind].name)
        if param not in component.defaults:
            raise UsageError(f"--tune: {kind} component {component.name!r} has no parameter {param!r}; "
                             f"valid: {', '.join(sorted(component.defaults)) or '(none)'}")
        if not isinstance(values, list | tuple) or len(values) < 2:
            raise UsageError(f"--tune {key} needs at least two candidate values, got {values!r}")


def split_calibration(inputs: RunInputs, n: int, seqlen: int, seed: int,
                      fraction: float = HELD_OUT_FRACTION, windows: int = HELD_OUT_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ids drawn from the first part of the calibration text, held-out
    windows from the last part): disjoint, deterministic for a seed."""
    from prunebench.harness.data import token_ids

    if inputs.calibration_text is None:
        raise UsageError("held-out tuning needs the calibration text (these inputs give token ids only)")
    ids = token_ids(inputs.tokenizer, inputs.calibration_text, "calibration")
    cut = int(len(ids) * (1.0 - fraction))
    head, tail = ids[:cut], ids[cut:]
    if len(tail) < windows * seqlen:
        raise NotEnoughDataError(f"held-out part of the calibration text has {len(tail)} tokens; "
                                 f"{windows} x {seqlen} needed for tuning")
    if len(head) < max(seqlen + 1, n * seqlen):
        raise NotEnoughDataError(f"calibration text without its held-out part has {len(head)} tokens; {n} x {seqlen} needed")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(head) - seqlen + 1, (n,), generator=generator)
    calibration = head[starts[:, None] + torch.arange(seqlen)[None, :]]
    held_out = tail[: windows * seqlen].reshape(windows, seqlen).clone()
    return calibration, held_out


def candidates(tune: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = sorted(tune)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))]


def tune_and_prune(session: RunSession, inputs: RunInputs) -> tuple[Any, PruneOutcome, dict[str, Any]]:
    """Prune a copy of the dense model per candidate, keep the best on held-out text."""
    profile, spec = session.profile, session.spec
    calibration, held_out = split_calibration(inputs, profile.calibration_samples, profile.calibration_seqlen, spec.seed)
    scored: list[dict[str, Any]] = []
    best: tuple[float, Any, PruneOutcome, dict[str, Any]] | None = None
    for values in candidates(spec.tune):
        overrides = [*spec.overrides, *(f"{k}={json.dumps(v)}" for k, v in values.items())]
        recipe = session.host.resolve(spec.method, overrides)
        model = copy.deepcopy(inputs.dense)
        run = session.run_context(inputs, model, calibration=calibration)
        outcome = prune(run, recipe, session.host, show_progress=session.show_progress)
        ppl = perplexity(run.model, held_out, batch_size=profile.batch_size, progress=False).ppl
        scored.append({"values": values, "held_out_ppl": ppl, "achieved": outcome.spent.get("transform", 0.0)
                       + outcome.spent.get("layers", 0.0)})
        if best is None or ppl < best[0]:
            best = (ppl, run.model, outcome, values)
    assert best is not None  # check_tune guarantees candidates
    _, model, outcome, chosen = best
    session.recipe = session.host.resolve(spec.method, [*spec.overrides, *(f"{k}={json.dumps(v)}" for k, v in chosen.items())])
    record = {
        "params": {k: list(v) for k, v in spec.tune.items()},
        "held_out": {"fraction": HELD_OUT_FRACTION, "windows": int(held_out.shape[0]), "seqlen": int(held_out.shape[1]),
                     "source": profile.calibration_source},
        "candidates": scored,
        "chosen": chosen,
    }
    return model, outcome, record
