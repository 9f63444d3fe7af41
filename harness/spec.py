"""What defines a run, what makes two runs comparable, and what names a result.

Three identities, each a hash of exactly what it claims to cover:

* the **protocol** (``protocol_of``): the conditions numbers are measured under (model,
  dtype, device type, calibration sizes, and the settings of every measured metric).
  Method, sparsity and seed are not in it: results of one protocol go in one table, and
  the runs of several calibration seeds are the repeated measurements of one cell;
* the **cell** (``cell_of``): the protocol plus the resolved recipe (every component and
  parameter), the sparsity, the seed and any tuned parameter. Two different cells never
  share an id, whatever their readable names (0.12 and 0.125 are two cells);
* the **result file name** (``result_name``): a readable prefix (model, recipe, sparsity,
  seed) and the cell id, so a folder can be read by eye and resumed by id.

This module is pure data: no model, no data and no torch import, so a grid, a report or
an executor can compute identities cheaply.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from prunebench.harness.cache import stable_key
from prunebench.harness.errors import UsageError
from prunebench.harness.profiles import Profile, get_profile, with_overrides

ID_LENGTH = 12
"""Hex digits of a protocol or cell id in result files and file names."""


@dataclass
class RunSpec:
    """Everything that defines one run.

    ``sparsity`` is the target fraction of decoder-layer parameters removed; None when a
    component parameter sets the budget itself (e.g. ``--set transform.slicing=0.2``).
    ``metrics`` names the metrics to measure (None: every default metric, less zero-shot
    and timing when ``zeroshot`` / ``timing`` are False). ``tune`` maps ``KIND.PARAM`` to
    candidate values picked on held-out calibration text (``harness.tuning``).
    ``profile_overrides`` are Profile fields; a value of None is honoured where the field
    allows it (``eval_samples=None``: every window).
    """

    model: str = "smollm2-135m"
    method: str = "wanda-sp"
    sparsity: float | None = 0.2
    overrides: list[str] = field(default_factory=list)
    profile: str = "offline"
    profile_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    zeroshot: bool = True
    timing: bool = True
    metrics: list[str] | None = None
    tune: dict[str, list[Any]] = field(default_factory=dict)
    save_dir: str | None = None
    use_cache: bool = True

    def resolved_profile(self) -> Profile:
        return with_overrides(get_profile(self.profile), **self.profile_overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """A spec from a result's ``spec`` block (unknown keys, like protocol ids, dropped)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def device_type(device: str) -> str:
    """``cuda:1`` -> ``cuda``: runs on two GPUs of one kind are comparable."""
    return device.split(":", 1)[0].strip()


def protocol_of(spec: RunSpec, profile: Profile, metric_settings: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two results to be compared (method, sparsity, seed excluded).

    ``metric_settings`` maps each measured metric with protocol-relevant settings to them
    (``Metric.settings``); metrics without settings (e.g. a KV-cache size read off the
    model) do not split protocols.
    """
    return {
        "model": spec.model,
        "dtype": spec.dtype,
        "device_type": device_type(spec.device),
        "calibration": {"source": profile.calibration_source, "samples": profile.calibration_samples,
                        "seqlen": profile.calibration_seqlen, "batch_size": profile.batch_size},
        "metrics": {name: settings for name, settings in sorted(metric_settings.items()) if settings is not None},
    }


def protocol_id(protocol: dict[str, Any]) -> str:
    return stable_key(protocol)[:ID_LENGTH]


def cell_of(protocol: dict[str, Any], recipe: dict[str, Any], sparsity: float | None, seed: int,
            tune: dict[str, list[Any]] | None = None) -> str:
    """The id of one grid cell: protocol, resolved recipe components, sparsity, seed, tuning.

    The recipe's *name* is not in it: two names for the same components and parameters
    (an alias kept for a renamed method) are the same cell.
    """
    components = recipe.get("components", recipe)
    return stable_key("cell", protocol, components, None if sparsity is None else float(sparsity), int(seed),
                      dict(tune or {}))[:ID_LENGTH]


def slug(text: str, keep: int = 60) -> str:
    """A file-name-safe version of ``text`` (its last ``keep`` characters)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[-keep:]


def result_name(spec: RunSpec, recipe_name: str, cell: str) -> str:
    """``<model>__<recipe>__s<sparsity>__seed<seed>__<cell id>.json``: readable, unique by id."""
    sparsity = "set" if spec.sparsity is None else f"{float(spec.sparsity):g}"
    # A model path keeps its tail (the folder name), a recipe its head (the method before its overrides).
    return f"{slug(spec.model, 40)}__{slug(recipe_name, 10_000)[:60]}__s{sparsity}__seed{spec.seed}__{cell}.json"


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` -> seeds; each a non-negative integer, no repeats."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in str(text).split(",") if p.strip()):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UsageError(f"--seeds expects integers like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds needs distinct non-negative integers, got {text!r}")
    return seeds
