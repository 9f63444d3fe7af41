"""prunebench: a benchmark harness for structured pruning of LLMs.

The distribution installs one import package, ``prunebench``; the repository keeps the
three top-level folders it is built from (``harness/`` -> ``prunebench.harness``,
``plugins/`` -> ``prunebench.plugins``, ``baselines/`` -> ``prunebench.baselines``,
mapped in ``pyproject.toml``). See ``docs/ARCHITECTURE.md``.

The old top-level import names ``harness``, ``plugins`` and ``baselines`` keep working
for one release (0.2.x) with a ``DeprecationWarning``: importing ``prunebench`` installs
an alias finder for them (``prunebench._legacy``).
"""

from __future__ import annotations

__version__ = "0.2.0"

from prunebench import _legacy

_legacy.install()
