"""Wanda-sp: structured Wanda (as in FLAP's reference code), the first baseline.

Per input channel j of ``o_proj`` / ``down_proj``: score_j = mean over output rows of
|W_ij| * sqrt(E[x_j^2]) (x = the channel's calibration activations). Heads score as the
sum of their channels; uniform ratio per layer; no bias compensation. Under GQA query
heads are scored and removed individually; a KV head goes with its last query head.
"""

from __future__ import annotations

from typing import Any

import torch

from prunebench.harness.budget import channels_to_keep, heads_to_keep
from prunebench.harness.components import Component
from prunebench.harness.context import LayerContext
from prunebench.harness.contracts import AttentionPlan, ComponentRef, MLPPlan, Recipe
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.scores import wanda_channel_scores
from prunebench.harness.surgery import attention_plan_of, keep_channels, keep_heads, mlp_plan_of


class WandaSpAttention(Component):
    """Remove whole query heads by the summed Wanda score of their o_proj input channels."""

    kind, name = "attention", "wanda-sp"

    @hookimpl
    def compress_attention(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> AttentionPlan | None:
        attn = layer.layer.self_attn
        if ratio <= 0 or attn.num_heads == 0:
            return None
        stats = layer.collect(["o_in"])["o_in"]
        plan = attention_plan_of(attn)
        channel = wanda_channel_scores(plan.o.weight, stats.second_moment)
        head_scores = channel.reshape(attn.num_heads, attn.v_dim).sum(1)
        kept = heads_to_keep(plan, head_scores, ratio)
        new = keep_heads(plan, kept)
        new.summary = {"kept_heads": kept, "num_kv_heads": new.num_kv_heads}
        return new


class WandaSpFFN(Component):
    """Remove FFN intermediate channels by their Wanda score at the down_proj input."""

    kind, name = "ffn", "wanda-sp"
    defaults = {"multiple": 8}

    @hookimpl
    def compress_mlp(self, layer: LayerContext, ratio: float, params: dict[str, Any]) -> MLPPlan | None:
        mlp = layer.layer.mlp
        if ratio <= 0 or mlp.intermediate == 0:
            return None
        stats = layer.collect(["down_in"])["down_in"]
        plan = mlp_plan_of(mlp)
        scores = wanda_channel_scores(plan.down.weight, stats.second_moment)
        k = channels_to_keep(plan, ratio, int(params["multiple"]))
        kept = torch.argsort(scores, descending=True, stable=True)[:k]
        new = keep_channels(plan, kept)
        new.summary = {"intermediate": k}
        return new


@hookimpl
def prunebench_components() -> list[Component]:
    return [WandaSpAttention(), WandaSpFFN()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "wanda-sp",
            {
                "allocation": ComponentRef("uniform"),
                "attention": ComponentRef("wanda-sp"),
                "ffn": ComponentRef("wanda-sp"),
            },
            "Structured Wanda (An et al. 2024's Wanda-sp): |W| * ||x|| per channel, uniform ratio.",
        )
    ]
