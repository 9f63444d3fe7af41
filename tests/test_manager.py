"""The plugin host: built-ins and third-party plugins look the same; names and
parameters are checked with the valid choices in the message."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import RunContext
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import param_report
from prunebench.harness.runner import prune
from prunebench.harness.testing import tiny_model

THIRD_PARTY = textwrap.dedent(
    '''
    """A method from outside the package: drop the FFN channels with the smallest down_proj norms."""
    import torch
    from prunebench.harness.components import Component
    from prunebench.harness.contracts import ComponentRef, Recipe
    from prunebench.harness.hookspecs import hookimpl
    from prunebench.harness.budget import channels_to_keep
    from prunebench.harness.surgery import keep_channels, mlp_plan_of

    class NormFFN(Component):
        """Keep the FFN channels with the largest down_proj column norms."""
        kind, name = "ffn", "norm-ffn"
        defaults = {"multiple": 1}

        @hookimpl
        def compress_mlp(self, layer, ratio, params):
            plan = mlp_plan_of(layer.layer.mlp)
            k = channels_to_keep(plan, ratio, params["multiple"])
            order = plan.down.weight.norm(dim=0).argsort(descending=True)
            return keep_channels(plan, order[:k])

    @hookimpl
    def prunebench_components():
        return [NormFFN()]

    @hookimpl
    def prunebench_recipes():
        return [Recipe("norm-ffn", {"ffn": ComponentRef("norm-ffn")}, "third-party test method")]
    '''
)


@pytest.fixture
def third_party_dist(tmp_path, monkeypatch):
    """An installed-looking distribution on sys.path that declares a prunebench entry point."""
    (tmp_path / "thirdparty_norm_ffn.py").write_text(THIRD_PARTY)
    dist = tmp_path / "thirdparty_norm_ffn-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-norm-ffn\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[prunebench]\nnorm-ffn = thirdparty_norm_ffn\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("thirdparty_norm_ffn", None)


def test_third_party_entry_point_plugin_registers_and_runs(third_party_dist, calib_ids):
    host = PluginHost()
    assert "norm-ffn" in host.names("ffn") and "norm-ffn" in host.recipes
    model, dense = to_pruned(tiny_model("llama-gqa")), to_pruned(tiny_model("llama-gqa"))
    run = RunContext(model=model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.2)
    prune(run, host.resolve("norm-ffn"), host, show_progress=False)
    assert model.model.layers[0].mlp.intermediate < dense.model.layers[0].mlp.intermediate
    assert param_report(dense, model)["achieved_sparsity"] > 0.1


def test_builtins_come_through_entry_points(host):
    assert "core" in {name for name, _ in host.pm.list_name_plugin()}
    assert host.names("allocation")[:1] and "uniform" in host.names("allocation")


def test_resolve_fills_defaults_and_applies_overrides(host):
    recipe = host.resolve("wanda-sp", ["ffn.multiple=1", "allocation.attention=0.5"])
    assert recipe.components["ffn"].params == {"multiple": 1}
    assert recipe.components["allocation"].params["attention"] == 0.5
    assert recipe.components["transform"].name == "none"
    swapped = host.resolve("wanda-sp", ["ffn=keep"])
    assert swapped.components["ffn"].name == "keep" and swapped.components["ffn"].params == {}


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("nope", [], "unknown method 'nope'; valid methods: "),
        ("wanda-sp", ["ffn=nope"], "unknown ffn component 'nope'; valid ffn components: "),
        ("wanda-sp", ["ffn.nope=1"], "unknown parameter 'nope' of ffn component 'wanda-sp'; valid: multiple"),
        ("wanda-sp", ["bogus=keep"], "unknown component kind 'bogus'"),
        ("wanda-sp", ["ffn"], "--set expects KIND=NAME or KIND.PARAM=VALUE"),
    ],
)
def test_bad_names_list_the_valid_choices(host, method, overrides, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        host.resolve(method, overrides)


def test_call_reaches_only_the_named_component(host, calib_ids):
    model = to_pruned(tiny_model("llama-mha"))
    run = RunContext(model=model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    recipe = host.resolve("wanda-sp", ["attention=keep"])
    prune(run, recipe, host, show_progress=False)
    assert all(layer.self_attn.num_heads == 4 for layer in model.model.layers)
    assert all(layer.mlp.intermediate < 96 for layer in model.model.layers)
