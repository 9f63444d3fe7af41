"""Data contracts between the core and the method plugins (docs/ARCHITECTURE.md, "contracts").

Everything a hook receives or returns is one of these types, so a plugin depends on this
module and ``hookspecs`` only. Plans carry real tensors: the core installs them by
rebuilding the layer's modules at the new sizes (``prunebench.harness.surgery``), so no plan can be
reported as pruning unless it really shrinks the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

COMPONENT_KINDS = ("transform", "importance", "allocation", "attention", "ffn")
"""The kinds of component a recipe names, in the order the pipeline runs them."""


@dataclass
class LinearWeights:
    """A projection in a plan: dense ``weight`` [out, in], or a factor pair ``up @ down``.

    ``down`` is [rank, in] and ``up`` is [out, rank] when low-rank; ``weight`` is None then.
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None

    def __post_init__(self) -> None:
        low_rank = self.down is not None or self.up is not None
        if low_rank == (self.weight is not None) or (low_rank and (self.down is None or self.up is None)):
            raise ValueError("LinearWeights needs either weight, or both down and up")

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int((self.weight if self.weight is not None else self.down).shape[1])

    @property
    def out_features(self) -> int:
        return int((self.weight if self.weight is not None else self.up).shape[0])

    def num_params(self) -> int:
        n = self.weight.numel() if self.weight is not None else self.down.numel() + self.up.numel()
        return int(n + (self.bias.numel() if self.bias is not None else 0))


@dataclass
class AttentionPlan:
    """The new attention of one layer.

    ``head_to_kv[h]`` is the KV head (index into the new KV heads) that kept query head h
    reads. q/k rows are laid out per head as ``[kept pair firsts | kept pair seconds |
    pass-through]``; ``rope_index[g]`` lists the original frequency index of each kept
    pair of KV head g. ``summary`` is free-form, recorded in the result (kept heads, dims).
    """

    head_to_kv: list[int]
    num_kv_heads: int
    qk_dim: int
    v_dim: int
    rope_index: torch.Tensor
    q: LinearWeights
    k: LinearWeights
    v: LinearWeights
    o: LinearWeights
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class MLPPlan:
    """The new MLP of one layer; ``branch`` is an optional parallel low-rank map d -> d."""

    gate: LinearWeights
    up: LinearWeights
    down: LinearWeights
    branch: LinearWeights | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def intermediate(self) -> int:
        return self.gate.out_features


@dataclass
class LayerShape:
    """Sizes of one decoder layer, and the parameter cost of its prunable units."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    qk_dim: int
    v_dim: int
    intermediate: int
    attention_params: int
    mlp_params: int


@dataclass
class ModelShape:
    """What allocation needs to turn ratios into parameter counts."""

    layers: list[LayerShape]

    @property
    def decoder_params(self) -> int:
        return sum(l.attention_params + l.mlp_params for l in self.layers)


@dataclass
class Importance:
    """Scores of prunable units, per layer: query heads, and FFN intermediate channels.

    ``attention[l]`` has one score per query head (or per o_proj input channel when a
    component documents so); ``mlp[l]`` one per intermediate channel. Higher = keep.
    """

    attention: list[torch.Tensor]
    mlp: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    attention_channels: list[torch.Tensor] | None = None  # optional: one score per o_proj input channel


@dataclass
class Allocation:
    """Per-layer fractions of attention and FFN parameters to remove."""

    attention: list[float]
    mlp: list[float]
    meta: dict[str, Any] = field(default_factory=dict)

    def removed_params(self, shape: ModelShape) -> float:
        return sum(
            a * l.attention_params + m * l.mlp_params for a, m, l in zip(self.attention, self.mlp, shape.layers)
        )


@dataclass
class ComponentRef:
    """A component named by a recipe, with its parameters (defaults filled in by the core)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A method as data: one component of each kind, with parameters.

    An ablation is the same recipe with one component swapped (``--set attention=NAME``).
    A method may also declare its cumulative ablation, as in a paper's ablation table:
    ``ablation_rows`` lists (row label, recipe name) from the most naive row to the method
    itself; ``prunebench ablate`` runs and tabulates them without knowing the method.
    """

    name: str
    components: dict[str, ComponentRef]
    description: str = ""
    role: str = "method"  # "method" (compared head to head) or "ablation" (a row of an ablation table)
    ablation_rows: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()  # former names, accepted with a deprecation message for one release
    formerly: tuple[str, ...] = ()
    """Names this recipe's results were recorded under before a rename that gave the name to
    another recipe: a recorded result under such a name whose components match this recipe's
    is reported as this recipe (a result records its components, so the match is by content)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "components": {k: {"name": c.name, "params": dict(c.params)} for k, c in self.components.items()},
        }
