"""LayerContext statistics: attention-only collection stops before the MLP and still gives
exactly the statistics of a full layer pass."""

from __future__ import annotations

import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import ATTENTION_SITES, LayerContext, RunContext, embed
from prunebench.harness.contracts import Allocation
from prunebench.harness.stats import SITES
from prunebench.harness.testing import tiny_model


def _ctx(kind: str) -> LayerContext:
    model = to_pruned(tiny_model(kind)).eval()
    ids = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(1))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.0)
    n = len(model.model.layers)
    return LayerContext(run, 0, embed(model, ids, 4, run.device), None, Allocation([0.0] * n, [0.0] * n))


def test_attention_sites_are_the_prefix_of_the_layer_order():
    assert SITES[: len(ATTENTION_SITES)] == ATTENTION_SITES


def test_attention_only_collection_skips_the_mlp_and_matches_a_full_pass():
    for kind in ("llama-gqa", "phi3"):
        early, full = _ctx(kind), _ctx(kind)
        calls = []
        handle = early.layer.mlp.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        got = early.collect({"o_in": True, "q_out": False, "attn_out": False})
        handle.remove()
        assert calls == []  # the MLP never ran
        # The same sites collected together with an MLP site run the whole layer.
        ref = full.collect({"o_in": True, "q_out": False, "attn_out": False, "down_in": False})
        for site in ("o_in", "q_out", "attn_out"):
            assert got[site].count == ref[site].count == 6 * 24
            torch.testing.assert_close(got[site].mean, ref[site].mean, rtol=0, atol=0)
        torch.testing.assert_close(got["o_in"].gram, ref["o_in"].gram, rtol=0, atol=0)
