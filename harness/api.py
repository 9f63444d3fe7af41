"""The public entry points of the library, in one import.

``run_experiment`` runs one spec (``harness.session.RunSession`` does the work);
``run_grid`` runs many (``harness.grid``); ``load_results`` and ``report`` read them back.
Before 0.2 this module held the run itself; its old helpers keep working for one release
(``validate``, ``protocol_of`` with the old signature, ``result_path``) with a
deprecation message.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from prunebench.harness.grid import run_grid
from prunebench.harness.manager import PluginHost
from prunebench.harness.profiles import Profile
from prunebench.harness.results import RunResult, load_results
from prunebench.harness.session import RunInputs, RunSession, run_experiment
from prunebench.harness.spec import RunSpec, protocol_id

__all__ = [
    "RunInputs", "RunResult", "RunSession", "RunSpec", "load_results", "protocol_id", "protocol_of", "result_path",
    "run_experiment", "run_grid", "validate",
]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"harness.api.{old} is deprecated: use {new} (removed in prunebench 0.3)", FutureWarning, stacklevel=3)


def validate(spec: RunSpec, host: PluginHost | None = None) -> tuple[Profile, Any]:
    """Deprecated: ``RunSession(spec)`` validates on construction (profile, recipe, ...)."""
    _deprecated("validate", "RunSession(spec).profile / .recipe")
    session = RunSession(spec, host=host)
    return session.profile, session.recipe


def protocol_of(spec: RunSpec, profile: Profile | None = None) -> dict[str, Any]:
    """Deprecated: ``RunSession(spec).protocol`` (the protocol now includes metric settings)."""
    _deprecated("protocol_of", "RunSession(spec).protocol or harness.spec.protocol_of")
    return RunSession(spec).protocol


def result_path(results_dir: str | Path, spec: RunSpec, *_: Any) -> Path:
    """Deprecated: ``RunSession(spec).result_path(results_dir)`` (names end with the cell id)."""
    _deprecated("result_path", "RunSession(spec).result_path(results_dir)")
    return RunSession(spec).result_path(results_dir)
