"""The 0.1 import names keep working for one release: ``harness``, ``plugins`` and
``baselines`` are the very modules of ``prunebench.*`` (never second copies) with a
DeprecationWarning naming the new import; a renamed method's old name resolves with a
FutureWarning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from prunebench.harness.contracts import ComponentRef, Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.manager import PluginHost

PROBE = """
import json, sys, warnings
from pathlib import Path
import prunebench
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import harness.components
    from plugins.mask_grad import MaskGrad
    import baselines.wanda_sp
import prunebench.harness.components, prunebench.plugins.mask_grad, prunebench.baselines.wanda_sp
try:
    import harness.no_such_module
    missing = "imported"
except ModuleNotFoundError:
    missing = "ModuleNotFoundError"
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    "repo_on_path": any(Path(p or ".").resolve() == Path(sys.argv[1]) for p in sys.path),
    "same_module": harness.components is prunebench.harness.components,
    "same_package": sys.modules["harness"] is sys.modules["prunebench.harness"],
    "same_class": harness.components.Component is prunebench.harness.components.Component,
    "same_plugin_class": MaskGrad is prunebench.plugins.mask_grad.MaskGrad,
    "plugin_name": MaskGrad.name,
    "same_baseline": baselines.wanda_sp is prunebench.baselines.wanda_sp,
    "missing": missing,
}))
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict:
    """The old imports in a new interpreter whose working directory holds none of the repo's
    folders, so ``harness`` can only come from the alias (one process: importing torch is slow)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(repo)], cwd=tmp_path_factory.mktemp("elsewhere"), env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_repo_folders_are_not_on_the_probes_path(fresh):
    assert not fresh["repo_on_path"]


def test_import_harness_gives_the_same_module_with_a_deprecation_warning(fresh):
    assert fresh["same_module"] and fresh["same_package"] and fresh["same_class"]
    deprecations = [msg for cat, msg in fresh["warnings"] if cat == "DeprecationWarning"]
    harness_warnings = [m for m in deprecations if "'import harness'" in m]
    assert len(harness_warnings) == 1  # one for the package, none for each submodule
    assert "'import harness' is deprecated: use 'prunebench.harness'" in harness_warnings[0]
    assert "removed in prunebench 0.3" in harness_warnings[0]


def test_from_plugins_import_a_component_class(fresh):
    assert fresh["same_plugin_class"] and fresh["plugin_name"] == "mask-grad"
    assert any(cat == "DeprecationWarning" and "use 'prunebench.plugins'" in msg for cat, msg in fresh["warnings"])


def test_baselines_alias_and_an_unknown_old_submodule(fresh):
    assert fresh["same_baseline"]
    assert any(cat == "DeprecationWarning" and "use 'prunebench.baselines'" in msg for cat, msg in fresh["warnings"])
    assert fresh["missing"] == "ModuleNotFoundError"


# ----- renamed methods -----------------------------------------------------------------------------
class RenamedPlugin:
    """A third-party plugin whose method was renamed from 'old-name' to 'new-name'."""

    @hookimpl
    def prunebench_recipes(self):
        return [Recipe("legacy-test-new-name", {"allocation": ComponentRef("uniform"), "attention": ComponentRef("wanda-sp"),
                                                "ffn": ComponentRef("wanda-sp")}, "test only",
                       aliases=("legacy-test-old-name",))]


@pytest.fixture(scope="module")
def renamed_host() -> PluginHost:
    return PluginHost(plugins=[RenamedPlugin()])


def test_an_old_method_name_resolves_to_the_new_recipe_with_a_future_warning(renamed_host):
    with pytest.warns(FutureWarning, match="'legacy-test-old-name' is now called 'legacy-test-new-name'"):
        recipe = renamed_host.recipe("legacy-test-old-name")
    assert recipe is renamed_host.recipes["legacy-test-new-name"]
    with pytest.warns(FutureWarning):
        resolved = renamed_host.resolve("legacy-test-old-name", ["ffn.multiple=16"])
    assert resolved.name == "legacy-test-new-name[ffn.multiple=16]"
    assert resolved.components == renamed_host.resolve("legacy-test-new-name", ["ffn.multiple=16"]).components


def test_the_new_name_resolves_without_a_warning(renamed_host):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed_host.recipe("legacy-test-new-name").name == "legacy-test-new-name"


def test_a_run_under_the_old_name_is_the_new_names_cell(renamed_host):
    from prunebench.harness.session import RunSession
    from prunebench.harness.spec import RunSpec

    def session(method):
        spec = RunSpec(method=method, sparsity=0.2, profile="ci", zeroshot=False, timing=False)
        return RunSession(spec, host=renamed_host, show_progress=False)

    with pytest.warns(FutureWarning):
        old = session("legacy-test-old-name")
    assert old.cell == session("legacy-test-new-name").cell


def test_an_alias_that_is_already_a_method_name_is_refused():
    class Clash:
        @hookimpl
        def prunebench_recipes(self):
            return [Recipe("legacy-test-clash", {"allocation": ComponentRef("uniform")}, aliases=("wanda-sp",))]

    with pytest.raises(ValueError, match="alias 'wanda-sp' of 'legacy-test-clash' is taken"):
        PluginHost(plugins=[Clash()])


def test_an_unknown_method_is_still_refused(renamed_host):
    with pytest.raises(UsageError, match="unknown method 'legacy-test-older-name'"):
        renamed_host.recipe("legacy-test-older-name")
