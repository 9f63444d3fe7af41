"""The dependency rule (docs/ARCHITECTURE.md): a method module (plugins/, baselines/)
imports from the core only its public contract modules, and never another method's
module (plugins/ is one method, IntraSlice: its modules may share code; each baseline is
its own method); no core module (harness/) imports a method module. Read from the source with
``ast`` (every import: top level, inside functions, under TYPE_CHECKING)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"harness": "prunebench.harness", "plugins": "prunebench.plugins", "baselines": "prunebench.baselines"}

CONTRACT_MODULES = frozenset({
    "budget", "clock", "component_cache", "components", "context", "contracts", "errors", "hookspecs", "obs", "params",
    "pruned_model", "scores", "stats", "surgery",
})
"""The core modules method modules import today, all public contracts. ``runner`` and
``cache`` are contracts too, but no method imports them now: add them here when one needs
them. ``component_cache`` (component result caching, which mask_grad moved to from
``cache``) and ``obs`` (greedy OBS shared by the two SoBP methods) are new modules that
declare themselves public contracts."""

KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()
"""Violations that exist today, listed so that no new one can pass; remove an entry when it
is fixed. (baselines/sobp_paper.py importing baselines/sobp.py was one until its shared
code moved to harness/obs.py; plugins/mask_grad.py importing the results store for
peak_rss_mb until that moved to harness/clock.py, the measuring primitives.)"""


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from a import b`` counts ``a.b``
    too, since b may be a module; relative imports are resolved against the file's package;
    the old top-level names are mapped to their prunebench names)."""
    folder = path.parent.relative_to(REPO).parts
    package = PACKAGES.get(folder[0], folder[0]) + "".join("." + p for p in folder[1:])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names if a.name != "*")
    mapped = set()
    for name in out:
        head, _, rest = name.partition(".")
        mapped.add(PACKAGES[head] + ("." + rest if rest else "") if head in PACKAGES else name)
    return mapped


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _core_module_of(name: str) -> str | None:
    """``prunebench.harness.X[.Y]`` -> ``X`` (None for another module)."""
    if not name.startswith("prunebench.harness."):
        return None
    return name.removeprefix("prunebench.harness.").split(".")[0]


def method_violations() -> set[tuple[str, str]]:
    found = set()
    for folder in ("plugins", "baselines"):
        for path in _modules(folder):
            rel = str(path.relative_to(REPO))
            own = PACKAGES[folder] + "." + path.stem
            for name in imported_modules(path):
                core = _core_module_of(name)
                if name == "prunebench.harness" or (core is not None and core not in CONTRACT_MODULES and
                                                    _is_module("harness", core)):
                    found.add((rel, name if core is None else f"prunebench.harness.{core}"))
                elif name.startswith(("prunebench.plugins.", "prunebench.baselines.")):
                    module = ".".join(name.split(".")[:3])
                    same_method = folder == "plugins" and module.startswith("prunebench.plugins.")
                    if module != own and not same_method and _is_module(module.split(".")[1], module.split(".")[2]):
                        found.add((rel, module))
    return found


def _is_module(folder: str, name: str) -> bool:
    return (REPO / folder / f"{name}.py").is_file() or (REPO / folder / name / "__init__.py").is_file()


# ----- the checker itself --------------------------------------------------------------------------
def test_the_parser_sees_every_kind_of_import(tmp_path, monkeypatch):
    folder = tmp_path / "baselines"
    folder.mkdir()
    (folder / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "from prunebench.harness.contracts import Recipe\n"
        "from prunebench.harness import surgery\n"
        "from . import wanda_sp\n"
        "from .flap import x\n"
        "from harness.runner import prune\n"
        "if TYPE_CHECKING:\n"
        "    from prunebench.harness.session import RunSession\n"
        "def f():\n"
        "    import prunebench.plugins.mask_grad\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    got = imported_modules(folder / "m.py")
    assert {"torch", "prunebench.harness.contracts", "prunebench.harness.surgery", "prunebench.baselines.wanda_sp",
            "prunebench.baselines.flap", "prunebench.harness.runner", "prunebench.harness.session",
            "prunebench.plugins.mask_grad"} <= got


def test_the_rule_catches_a_core_internal_and_another_method(tmp_path, monkeypatch):
    for folder, files in {"harness": ("session.py", "contracts.py"), "baselines": ("flap.py",), "plugins": ()}.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_text("")
    (tmp_path / "plugins" / "mine.py").write_text(
        "from prunebench.harness.contracts import Recipe\n"
        "def f():\n"
        "    from prunebench.harness.session import RunSession\n"
        "    from prunebench.baselines.flap import FlapFFN\n"
        "    from prunebench.plugins import mine\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert method_violations() == {("plugins/mine.py", "prunebench.harness.session"),
                                   ("plugins/mine.py", "prunebench.baselines.flap")}


def test_the_checker_finds_method_imports_today():
    wanda = imported_modules(REPO / "baselines" / "wanda_sp.py")
    assert {"prunebench.harness.contracts", "prunebench.harness.hookspecs", "prunebench.harness.surgery"} <= wanda


# ----- the rule ------------------------------------------------------------------------------------
def test_method_modules_import_only_contract_modules_and_no_other_method():
    found = method_violations()
    new = found - KNOWN_VIOLATIONS
    assert not new, f"method modules break the dependency rule: {sorted(new)}"
    fixed = KNOWN_VIOLATIONS - found
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(fixed)}"


def test_the_contract_list_holds_only_modules_methods_use():
    used = {_core_module_of(n) for folder in ("plugins", "baselines") for p in _modules(folder) for n in imported_modules(p)}
    assert used >= CONTRACT_MODULES, f"no method imports {sorted(CONTRACT_MODULES - used)}: drop it from the list"
    assert all(_is_module("harness", m) for m in CONTRACT_MODULES)


@pytest.mark.parametrize("path", _modules("harness"), ids=lambda p: str(p.relative_to(REPO)))
def test_core_modules_never_import_a_method_module(path):
    bad = sorted(n for n in imported_modules(path) if n.startswith(("prunebench.plugins", "prunebench.baselines")))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}"
