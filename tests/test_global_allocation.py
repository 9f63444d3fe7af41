"""Tests of the `global` allocation and of the IntraSlice recipes."""

from __future__ import annotations

import pytest
import torch

from prunebench.harness.contracts import Importance, LayerShape, ModelShape
from prunebench.harness.errors import UsageError
from prunebench.plugins.global_allocation import GlobalAllocation, global_allocation, remove_lowest, respread_cap
from prunebench.plugins.intraslice import ablation_labels, ablation_recipes
from prunebench.plugins.mask_grad import ChannelImportance


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core box OpenMP's
    spin-waiting makes every small op slow (seconds instead of milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PARAMS = dict(GlobalAllocation.defaults)


def llama_layer(hidden: int = 64, heads: int = 4, kv: int = 2, head_dim: int = 16, inter: int = 96) -> LayerShape:
    attn = hidden * heads * head_dim * 2 + 2 * hidden * kv * head_dim
    return LayerShape(hidden, heads, kv, head_dim, head_dim, inter, attn, 3 * hidden * inter)


def uneven_shape() -> ModelShape:
    """Layers of different widths, as after an earlier pruning pass."""
    return ModelShape([llama_layer(), llama_layer(inter=128), llama_layer(heads=2, kv=1, inter=64), llama_layer(), llama_layer(inter=160)])


def random_importance(shape: ModelShape, gen: torch.Generator) -> ChannelImportance:
    """Heavy-tailed random scores with a random per-layer scale, like real squared gradients."""
    channels, mlp = [], []
    for layer in shape.layers:
        channels.append(torch.rand(layer.num_heads * layer.v_dim, generator=gen, dtype=torch.float64) ** 3 * torch.rand(1, generator=gen, dtype=torch.float64))
        mlp.append(torch.rand(layer.intermediate, generator=gen, dtype=torch.float64) ** 3 * torch.rand(1, generator=gen, dtype=torch.float64))
    heads = [c.reshape(l.num_heads, -1).sum(1) for c, l in zip(channels, shape.layers)]
    return ChannelImportance(heads, mlp, attention_channels=channels)


def equal_importance(shape: ModelShape) -> ChannelImportance:
    channels = [torch.ones(l.num_heads * l.v_dim, dtype=torch.float64) for l in shape.layers]
    return ChannelImportance(
        [torch.full((l.num_heads,), float(l.v_dim), dtype=torch.float64) for l in shape.layers],
        [torch.ones(l.intermediate, dtype=torch.float64) for l in shape.layers],
        attention_channels=channels,
    )


@pytest.mark.parametrize("unit", ["channel", "head"])
def test_equal_importances_with_unit_bias_give_uniform_ratios(unit: str) -> None:
    shape = ModelShape([llama_layer() for _ in range(6)])
    for target in (0.1, 0.25, 0.4):
        alloc = global_allocation(equal_importance(shape), target, shape, {**PARAMS, "lambda_b": 1.0, "attention_unit": unit})
        assert max(alloc.attention) - min(alloc.attention) < 1e-12
        assert max(alloc.mlp) - min(alloc.mlp) < 1e-12
        # the FFN keeps a multiple of 8 channels nearest to the target; attention absorbs the rounding
        assert alloc.mlp[0] == pytest.approx(target, abs=4 / 96 + 1e-12)
        assert alloc.attention[0] == pytest.approx(target, abs=0.1)
        assert alloc.removed_params(shape) == pytest.approx(target * shape.decoder_params, rel=1e-9)


def test_budget_and_caps_hold_for_random_importances() -> None:
    shape = uneven_shape()
    gen = torch.Generator().manual_seed(0)
    total = shape.decoder_params
    for target in (0.05, 0.2, 0.3, 0.5, 0.6):
        for lambda_b in (0.5, 0.8, 1.0, 1.2):
            for cap in (0.8, 0.7):
                imp = random_importance(shape, gen)
                alloc = global_allocation(imp, target, shape, {**PARAMS, "lambda_b": lambda_b, "cap": cap})
                assert alloc.removed_params(shape) == pytest.approx(target * total, rel=1e-9), (target, lambda_b, cap)
                assert max(alloc.attention) <= cap + 1e-12 and max(alloc.mlp) <= cap + 1e-12
                assert min(alloc.attention) >= 0 and min(alloc.mlp) >= 0
                for ratio, layer in zip(alloc.mlp, shape.layers):
                    kept = layer.intermediate * (1 - ratio)
                    assert abs(kept - round(kept / 8) * 8) < 1e-6, "FFN keeps a multiple of 8 channels"


def test_bias_sets_the_overall_ffn_ratio() -> None:
    shape = uneven_shape()
    imp = random_importance(shape, torch.Generator().manual_seed(1))
    mlp_total = sum(l.mlp_params for l in shape.layers)
    for lambda_b in (0.6, 1.0, 1.1):
        alloc = global_allocation(imp, 0.3, shape, {**PARAMS, "lambda_b": lambda_b})
        ffn = sum(r * l.mlp_params for r, l in zip(alloc.mlp, shape.layers)) / mlp_total
        assert ffn == pytest.approx(lambda_b * 0.3, abs=8 / 64)  # within one rounding step of the narrowest layer
        assert alloc.meta["ffn_overall"] == pytest.approx(ffn)


@pytest.mark.parametrize("unit", ["channel", "head"])
def test_unimportant_layer_gets_a_higher_ratio(unit: str) -> None:
    shape = ModelShape([llama_layer() for _ in range(5)])
    imp = random_importance(shape, torch.Generator().manual_seed(2))
    before = global_allocation(imp, 0.3, shape, {**PARAMS, "attention_unit": unit})
    weak = 3
    imp.mlp[weak] = imp.mlp[weak] * 1e-3
    imp.attention_channels[weak] = imp.attention_channels[weak] * 1e-3
    imp.attention[weak] = imp.attention[weak] * 1e-3
    after = global_allocation(imp, 0.3, shape, {**PARAMS, "attention_unit": unit})
    assert after.mlp[weak] > before.mlp[weak] and after.attention[weak] > before.attention[weak]
    assert after.mlp[weak] == max(after.mlp) and after.attention[weak] == max(after.attention)


def test_cap_binds_and_the_rest_moves_elsewhere() -> None:
    shape = ModelShape([llama_layer() for _ in range(4)])
    imp = random_importance(shape, torch.Generator().manual_seed(3))
    imp.mlp[0] = imp.mlp[0] * 0.0  # worthless: the whole layer would go without the cap
    imp.attention_channels[0] = imp.attention_channels[0] * 0.0
    alloc = global_allocation(imp, 0.4, shape, {**PARAMS, "cap": 0.6})
    assert alloc.mlp[0] == pytest.approx(0.6, abs=8 / 96) and alloc.mlp[0] <= 0.6
    assert alloc.attention[0] == pytest.approx(0.6)
    assert alloc.removed_params(shape) == pytest.approx(0.4 * shape.decoder_params, rel=1e-9)


def test_remove_lowest_splits_ties_evenly_and_respects_limits() -> None:
    scores = [torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 2.0, 3.0])]
    # 1 unit below the tie, 4 tied units at 2.0; 3 more units of cost 1 come from the tie, 3/4 of each layer's tied units
    assert remove_lowest(scores, [1.0, 1.0], [3.0, 3.0], 4.0) == pytest.approx([1.0 + 1.5, 1.5])
    assert remove_lowest(scores, [1.0, 1.0], [3.0, 1.0], 4.0) == pytest.approx([3.0, 1.0])
    assert remove_lowest(scores, [1.0, 1.0], [3.0, 3.0], 0.0) == [0.0, 0.0]
    assert remove_lowest(scores, [1.0, 1.0], [1.0, 1.0], 5.0) == [1.0, 1.0]


def test_head_scores_work_without_channel_scores() -> None:
    shape = ModelShape([llama_layer() for _ in range(3)])
    imp = Importance([torch.tensor([1.0, 2.0, 3.0, 4.0]) * (i + 1) for i in range(3)], [torch.rand(96) for _ in range(3)])
    alloc = global_allocation(imp, 0.3, shape, PARAMS)
    assert alloc.meta["attention_unit"] == "head"
    assert alloc.attention[0] > alloc.attention[2]
    assert alloc.removed_params(shape) == pytest.approx(0.3 * shape.decoder_params, rel=1e-9)


def test_errors_are_clear() -> None:
    shape = ModelShape([llama_layer() for _ in range(2)])
    with pytest.raises(UsageError, match="needs importance"):
        GlobalAllocation().allocate_ratios(None, 0.3, shape, PARAMS)
    with pytest.raises(UsageError, match="cannot be met"):
        global_allocation(equal_importance(shape), 0.9, shape, PARAMS)
    bad = equal_importance(shape)
    bad.mlp[1][3] = float("nan")
    with pytest.raises(FloatingPointError):
        global_allocation(bad, 0.3, shape, PARAMS)


# ----- selection="reference" --------------------------------------------------------------------
REFERENCE = {**PARAMS, "selection": "reference"}


def _slack(shape: ModelShape) -> float:
    """One head and one neuron of the widest layer: the reference's count granularity."""
    return max(l.attention_params / l.num_heads + l.mlp_params / l.intermediate for l in shape.layers)


def test_reference_ratios_are_head_and_neuron_count_fractions() -> None:
    shape = ModelShape([llama_layer() for _ in range(6)])
    imp = random_importance(shape, torch.Generator().manual_seed(4))
    for target in (0.2, 0.3, 0.45):
        alloc = global_allocation(imp, target, shape, {**REFERENCE, "cap": 1.0})  # no cap: the raw counts
        heads = [round((1 - r) * 4) for r in alloc.attention]
        neurons = [round((1 - r) * 96) for r in alloc.mlp]
        assert all(abs((1 - r) * 4 - k) < 1e-9 for r, k in zip(alloc.attention, heads))
        assert all(abs((1 - r) * 96 - k) < 1e-9 for r, k in zip(alloc.mlp, neurons))
        # kept heads: the top sum(heads) by raw score over all layers
        flat = torch.cat(imp.attention)
        top = torch.argsort(flat, descending=True)[: sum(heads)]
        assert [int((top // 4 == l).sum()) for l in range(6)] == heads
        assert sum(neurons) == int(6 * 96 * (1 - target))
        assert alloc.removed_params(shape) == pytest.approx(target * shape.decoder_params, abs=_slack(shape))
        assert alloc.meta["selection"] == "reference"


def test_reference_counts_gqa_heads_at_their_fractional_cost() -> None:
    """q + o + (G/N)(k + v) per head: removing a head fraction removes that fraction of the
    attention's parameters, so the total meets the target within one head and one neuron."""
    shape = uneven_shape()
    gen = torch.Generator().manual_seed(5)
    for target in (0.1, 0.25, 0.4):
        for lambda_b in (0.8, 1.0, 1.2):
            alloc = global_allocation(random_importance(shape, gen), target, shape, {**REFERENCE, "lambda_b": lambda_b, "cap": 1.0})
            assert alloc.removed_params(shape) == pytest.approx(target * shape.decoder_params, abs=_slack(shape))
            kept = sum((1 - r) * l.intermediate for r, l in zip(alloc.mlp, shape.layers))
            assert round(kept) == int(sum(l.intermediate for l in shape.layers) * (1 - lambda_b * target))


def test_reference_equal_scores_give_uniform_ratios() -> None:
    shape = ModelShape([llama_layer() for _ in range(4)])
    for target in (0.25, 0.5):  # 16 heads and 384 neurons: the kept counts split evenly over 4 layers
        alloc = global_allocation(equal_importance(shape), target, shape, REFERENCE)
        assert max(alloc.attention) - min(alloc.attention) < 1e-12
        assert max(alloc.mlp) - min(alloc.mlp) < 1e-12
        assert alloc.mlp[0] == pytest.approx(target) and alloc.attention[0] == pytest.approx(target)
    odd = global_allocation(equal_importance(shape), 0.3, shape, REFERENCE)  # counts not divisible by 4: within one unit
    assert max(odd.attention) - min(odd.attention) <= 1 / 4 + 1e-12 and max(odd.mlp) - min(odd.mlp) <= 1 / 96 + 1e-12


def test_respread_cap_moves_the_excess_to_the_largest_ratios_first() -> None:
    out = respread_cap([0.9, 0.5, 0.3, 0.0, 0.8], 0.8)
    assert out == pytest.approx([0.8, 0.5 + 0.1 * 0.5 / 0.8, 0.3 + 0.1 * 0.3 / 0.8, 0.0, 0.8])  # 0 and the cap get nothing
    out = respread_cap([1.0, 1.0, 0.7, 0.1], 0.8)  # the largest fills up to the cap, the rest goes on
    assert out == pytest.approx([0.8, 0.8, 0.8, 0.4]) and sum(out) == pytest.approx(2.8)
    assert respread_cap([1.0, 0.8, 0.0], 0.8) == [0.8, 0.8, 0.0]  # nowhere to go: the excess is lost
    assert respread_cap([0.5, 0.2], 0.8) == [0.5, 0.2]


def test_reference_cap_respreads_and_conserves_the_total() -> None:
    shape = ModelShape([llama_layer() for _ in range(4)])
    imp = random_importance(shape, torch.Generator().manual_seed(6))
    imp.attention[0] = imp.attention[0] * 0.0  # worthless layer 0: every head would go without the cap
    imp.mlp[0] = imp.mlp[0] * 0.0
    raw = global_allocation(imp, 0.4, shape, {**REFERENCE, "cap": 1.0})
    assert raw.attention[0] == 1.0 and raw.mlp[0] == 1.0
    capped = global_allocation(imp, 0.4, shape, REFERENCE)
    assert max(capped.attention + capped.mlp) <= 0.8 + 1e-12 and capped.attention[0] == 0.8
    assert sum(capped.attention) == pytest.approx(sum(raw.attention)) and sum(capped.mlp) == pytest.approx(sum(raw.mlp))
    assert capped.removed_params(shape) == pytest.approx(raw.removed_params(shape), rel=1e-12)
    assert capped.removed_params(shape) == pytest.approx(0.4 * shape.decoder_params, abs=_slack(shape))
    with pytest.raises(UsageError, match="selection"):
        global_allocation(imp, 0.4, shape, {**PARAMS, "selection": "paper"})


def test_ablation_recipes_resolve_in_table_order() -> None:
    from prunebench.harness.manager import PluginHost

    host = PluginHost()
    names = ablation_recipes()
    assert names == ["intraslice-naive", "intraslice-ada-h", "intraslice-pca-a", "intraslice-paper-ablation-ipca"]
    assert list(ablation_labels().values()) == ["Naive", "+Ada-H", "+Pca-A", "+IPca"]
    rows = [host.resolve(n).components for n in names]
    assert [r["importance"].name for r in rows] == ["mask-grad", "mask-grad", "mask-grad-pca", "mask-grad-pca"]
    assert [r["attention"].name for r in rows] == ["head-prune", "intraslice-head-pca", "intraslice-head-pca", "intraslice-head-pca"]
    assert [r["ffn"].name for r in rows] == ["select-ls", "select-ls", "select-ls", "intraslice-iterpca"]
    assert all(r["allocation"].name == "global" for r in rows)


def test_pca_a_recipe_prunes_a_tiny_model_to_the_target() -> None:
    from prunebench.harness.adapters import to_pruned
    from prunebench.harness.context import RunContext
    from prunebench.harness.manager import PluginHost
    from prunebench.harness.params import param_report
    from prunebench.harness.runner import prune
    from prunebench.harness.testing import tiny_model

    host = PluginHost()
    model = to_pruned(tiny_model("llama-gqa", layers=3))
    dense = param_report(model, model)["dense"]
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    outcome = prune(run, host.resolve("intraslice-pca-a"), host, show_progress=False)
    assert outcome.allocation.meta["rule"] == "global"
    assert outcome.importance_meta["basis"] == "pca"
    assert len(set(outcome.allocation.mlp)) > 1, "global ratios are non-uniform on a random model"
    assert param_report(dense, run.model)["achieved_sparsity"] == pytest.approx(0.3, abs=0.03)
