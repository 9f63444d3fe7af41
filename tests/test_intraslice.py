"""The IntraSlice recipes: ``intraslice`` is the reference code's configuration, ``intraslice+``
differs by the declared improvements only, the Table-4 rows end with the full paper
method, and every recipe prunes tiny MHA, GQA, Phi-3 and partial-rotary models."""

from __future__ import annotations

import pytest
import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.budget import AttentionCost
from prunebench.harness.context import RunContext
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import param_report
from prunebench.harness.runner import prune
from prunebench.harness.testing import tiny_model
from prunebench.plugins.intraslice import IMPROVEMENTS, REFERENCE


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(host: PluginHost, method: str) -> dict[str, tuple[str, dict]]:
    return {kind: (ref.name, ref.params) for kind, ref in host.resolve(method).components.items()}


def test_intraslice_is_the_reference_configuration(host: PluginHost) -> None:
    got = _params(host, "intraslice")
    assert got["importance"][0] == "mask-grad" and got["importance"][1]["grad_group"] == 8
    assert got["importance"][1]["head_score"] == "summed"
    assert got["allocation"][0] == "global" and got["allocation"][1]["selection"] == "reference"
    assert (got["allocation"][1]["lambda_b"], got["allocation"][1]["cap"]) == (1.0, 0.8)
    attention = got["attention"][1]
    assert got["attention"][0] == "intraslice-head-pca"
    assert (attention["split"], attention["pre_delete"], attention["spectra"], attention["lsq_prior"]) == (
        "shared", True, "head", "zero")
    assert attention["lsq_ridge_mean"] == "all" and attention["qk_floor"] == 0.75
    assert got["ffn"][0] == "select-ls" and (got["ffn"][1]["ridge"], got["ffn"][1]["score"]) == ("fixed", "damped")
    assert host.recipe("intraslice").role == "method"


def test_intraslice_plus_changes_only_the_improvements(host: PluginHost) -> None:
    base, plus = _params(host, "intraslice"), _params(host, "intraslice+")
    assert plus["attention"][1]["spectra"] == "kv-group"
    for kind in base:
        assert plus[kind][0] == base[kind][0]
        changed = {k for k in base[kind][1] if base[kind][1][k] != plus[kind][1][k]}
        assert changed == set(IMPROVEMENTS.get(kind, {})), kind
    assert set(REFERENCE) == {"importance", "allocation", "attention", "ffn"}
    assert host.recipe("intraslice+").role == "method"


def test_table_4_rows_end_with_the_full_paper_method(host: PluginHost) -> None:
    rows = host.recipe("intraslice").ablation_rows
    assert [label for label, _ in rows] == ["Naive", "+Ada-H", "+Pca-A", "+IPca"]
    last = _params(host, rows[-1][1])
    assert last["importance"][0] == "mask-grad-pca" and last["ffn"][0] == "intraslice-iterpca"
    assert last["attention"][0] == "intraslice-head-pca" and last["allocation"][0] == "global"
    assert all(host.recipe(name).role == "ablation" for _, name in rows)
    # the rows run at the components' project defaults, as before the reference recipe existed
    for kind, (name, params) in last.items():
        assert params == host.component(kind, name).defaults, kind


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa", "phi3", "phi3-partial"])
@pytest.mark.parametrize("method", ["intraslice", "intraslice+"])
def test_recipes_prune_tiny_models(host: PluginHost, kind: str, method: str) -> None:
    model = to_pruned(tiny_model(kind, layers=3))
    dense = param_report(model, model)["dense"]
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3,
                     use_cache=False)
    shapes = [AttentionCost(hidden=64, qk_dim=16, v_dim=16, pairs=l.self_attn.rope_pairs) for l in model.model.layers]
    outcome = prune(run, host.resolve(method), host, show_progress=False)
    assert outcome.allocation.meta["selection"] == "reference"
    assert all(r * 4 == pytest.approx(round(r * 4)) for r in outcome.allocation.meta["uncapped_attention"])  # whole heads
    assert max(outcome.allocation.attention + outcome.allocation.mlp) <= 0.8 + 1e-12
    for layer, cost in zip(run.model.model.layers, shapes):
        attn = layer.self_attn
        assert attn.num_heads == 0 or attn.qk_dim == attn.v_dim >= cost.qk_floor(0.75)
    # whole heads, pair steps and 8-channel FFN widths on a 4-head, 96-wide model: a few percent
    assert param_report(dense, run.model)["achieved_sparsity"] == pytest.approx(0.3, abs=0.04)
    with torch.no_grad():
        assert torch.isfinite(run.model(ids).logits).all()


def test_paper_ablation_row_prunes_partial_rotary(host: PluginHost) -> None:
    model = to_pruned(tiny_model("phi3-partial", layers=3))
    dense = param_report(model, model)["dense"]
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3,
                     use_cache=False)
    outcome = prune(run, host.resolve("intraslice-paper-ablation-ipca", ["ffn.iterate_fraction=1.0", "ffn.steps=5"]),
                    host, show_progress=False)
    assert outcome.importance_meta["basis"] == "pca"
    assert any(note["ffn"]["iterated"] for note in outcome.layers if "ffn" in note)
    assert param_report(dense, run.model)["achieved_sparsity"] == pytest.approx(0.3, abs=0.03)
