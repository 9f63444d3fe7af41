"""Deprecated import names of 0.1 (``harness``, ``plugins``, ``baselines``), for one release.

In 0.1 the distribution installed three top-level packages; a third-party plugin wrote
``from harness.components import Component``. Importing ``prunebench`` installs a finder
that serves those names as aliases of ``prunebench.harness`` etc.: the *same* module
objects (never a second copy, so classes and registries stay one), with a
``DeprecationWarning`` naming the new import. The finder stands aside when another
distribution provides a real top-level package of that name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

LEGACY_NAMES: dict[str, str] = {
    "harness": "prunebench.harness",
    "plugins": "prunebench.plugins",
    "baselines": "prunebench.baselines",
}
"""Old top-level name -> the package it now lives under."""

REMOVED_IN = "0.3"


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name by importing the new one and putting that module in its place."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder module; exec_module swaps in the real one

    def exec_module(self, module: ModuleType) -> None:
        if "." not in module.__name__:
            warnings.warn(
                f"'import {module.__name__}' is deprecated: use '{self.target}' "
                f"(the old name is removed in prunebench {REMOVED_IN})",
                DeprecationWarning,
                stacklevel=2,
            )
        sys.modules[module.__name__] = importlib.import_module(self.target)


class LegacyAliasFinder(importlib.abc.MetaPathFinder):
    """Serves ``harness[.x]`` as ``prunebench.harness[.x]`` (and the same for the others)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        head, _, rest = fullname.partition(".")
        new_head = self.names.get(head)
        if new_head is None:
            return None
        new = new_head + ("." + rest if rest else "")
        try:
            if importlib.util.find_spec(new) is None:
                return None
        except ModuleNotFoundError:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def _foreign(name: str, target: str) -> bool:
    """Whether a top-level package ``name`` other than our own folder is importable."""
    spec = importlib.machinery.PathFinder.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return False
    own = importlib.util.find_spec(target)
    own_dirs = {Path(p).resolve() for p in (own.submodule_search_locations or [])} if own else set()
    return not {Path(p).resolve() for p in spec.submodule_search_locations} <= own_dirs


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once), for the names no other
    distribution owns. First, because a submodule of an aliased package would otherwise be
    found again through the package's path and loaded as a second, different module."""
    if any(isinstance(f, LegacyAliasFinder) for f in sys.meta_path):
        return
    names = {old: new for old, new in LEGACY_NAMES.items() if old not in sys.modules and not _foreign(old, new)}
    if names:
        sys.meta_path.insert(0, LegacyAliasFinder(names))
