"""Protocol profiles: one set of calibration / evaluation / timing sizes per use.

Every method in a comparison runs under the same profile, and the result records every
size, so runs under different protocols are never compared by accident. Sizes follow
docs/PROTOCOL.md's table; any field can be overridden per run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prunebench.harness.errors import UsageError

#: The paper's seven zero-shot tasks in its Table 1 order: the one list of them. Every
#: profile runs them, and harness/zeroshot.py's ``TASKS`` gives each its metric
#: (tests/test_zeroshot.py checks that both name the same tasks in the same order).
SEVEN_TASKS = ("arc_challenge", "arc_easy", "winogrande", "boolq", "hellaswag", "openbookqa", "piqa")


@dataclass(frozen=True)
class Profile:
    name: str
    calibration_source: str
    calibration_samples: int
    calibration_seqlen: int
    eval_sources: tuple[str, ...]
    eval_samples: int | None  # None = the whole test text
    eval_seqlen: int
    tasks: tuple[str, ...]
    task_limit: int | None  # None = all items
    task_batch_size: int
    batch_size: int
    timing: dict[str, int] = field(default_factory=dict)
    task_max_length: int = 2048  # zero-shot context limit (prompts are not cut to the perplexity window)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        "ci", "wiki-offline", 8, 256, ("wiki-offline", "books-offline"), 8, 256, SEVEN_TASKS, 20, 16, 4,
        {"batch": 1, "seqlen": 128, "decode_tokens": 8, "kv_len": 128, "warmup": 1, "repeats": 3, "layers": 3},
    ),
    "offline": Profile(
        "offline", "wiki-offline", 64, 512, ("wiki-offline", "books-offline"), 64, 512, SEVEN_TASKS, 100, 16, 4,
        {"batch": 1, "seqlen": 512, "decode_tokens": 32, "kv_len": 512, "warmup": 2, "repeats": 5, "layers": 6},
    ),
    "paper": Profile(
        "paper", "wikitext2", 128, 2048, ("wikitext2",), None, 2048, SEVEN_TASKS, None, 16, 4,
        {"batch": 1, "seqlen": 2048, "decode_tokens": 128, "kv_len": 2048, "warmup": 3, "repeats": 10, "layers": 0},
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}") from None


NULLABLE_FIELDS = ("eval_samples", "task_limit")
"""Profile fields where None means "all" (every evaluation window, every zero-shot item)."""
ALL = "all"
"""What a user writes for None in those fields (``--eval-samples all``, ``--limit all``)."""


def with_overrides(profile: Profile, **overrides: Any) -> Profile:
    """The profile with the given fields replaced, each checked.

    Every given key is honoured, None included: ``eval_samples=None`` (or ``"all"``) asks
    for every window, ``task_limit=None`` for every item. An override that cannot be
    honoured is refused, never dropped: an unknown field, None (or ``"all"``) for a field
    that needs a number, a non-positive size.
    """
    unknown = set(overrides) - set(Profile.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown profile field(s) {sorted(unknown)}; valid: {', '.join(Profile.__dataclass_fields__)}")
    given = dict(overrides)
    for key, value in list(given.items()):
        if isinstance(value, str) and value.strip().lower() == ALL:
            value = given[key] = None
        if value is None and key not in NULLABLE_FIELDS:
            raise UsageError(f"{key.replace('_', ' ')} cannot be 'all'/None; only {', '.join(NULLABLE_FIELDS)} can")
    for key in ("calibration_samples", "calibration_seqlen", "eval_samples", "eval_seqlen", "batch_size", "task_batch_size", "task_max_length"):
        if key in given and given[key] is not None and int(given[key]) < 1:
            raise UsageError(f"{key.replace('_', ' ')} must be at least 1, got {given[key]}")
    if "task_limit" in given and given["task_limit"] is not None and int(given["task_limit"]) <= 0:
        raise UsageError(f"zero-shot limit must be positive, got {given['task_limit']}")
    for key in ("eval_sources", "tasks"):
        if key in given:
            given[key] = tuple(given[key])
    return replace(profile, **given)
