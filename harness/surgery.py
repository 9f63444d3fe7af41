"""Installing plans into the model, and the plan-building operations methods share.

``apply_*_plan`` rebuilds a layer's attention or MLP at the plan's sizes (new, smaller
modules; the config's per-layer spec is updated so ``save_pretrained`` records them).
The helpers below turn selections and transforms into plans: keep query heads (KV heads
go when their last query head goes), keep rotary pairs per KV group, fuse a v-basis and
an o-map, keep FFN channels. Methods compose them instead of slicing tensors by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from prunebench.harness.contracts import AttentionPlan, LinearWeights, MLPPlan
from prunebench.harness.pruned_model import (
    LowRankLinear,
    PrunedAttention,
    PrunedForCausalLM,
    PrunedMLP,
    linear_spec,
)


# ----- reading the current layer as a plan ------------------------------------------------
def _weights_of(module: nn.Module) -> LinearWeights:
    bias = None if module.bias is None else module.bias.detach().clone()
    if isinstance(module, LowRankLinear):
        return LinearWeights(down=module.down.weight.detach().clone(), up=module.up.weight.detach().clone(), bias=bias)
    return LinearWeights(weight=module.weight.detach().clone(), bias=bias)


def attention_plan_of(attn: PrunedAttention) -> AttentionPlan:
    """The identity plan: the attention as it is now (copies of its tensors)."""
    return AttentionPlan(
        head_to_kv=attn.head_to_kv.tolist(),
        num_kv_heads=attn.num_kv_heads,
        qk_dim=attn.qk_dim,
        v_dim=attn.v_dim,
        rope_index=attn.rope_index.clone(),
        q=_weights_of(attn.q_proj),
        k=_weights_of(attn.k_proj),
        v=_weights_of(attn.v_proj),
        o=_weights_of(attn.o_proj),
    )


def mlp_plan_of(mlp: PrunedMLP) -> MLPPlan:
    """The identity plan of an MLP."""
    return MLPPlan(
        gate=_weights_of(mlp.gate_proj),
        up=_weights_of(mlp.up_proj),
        down=_weights_of(mlp.down_proj),
        branch=None if mlp.branch is None else _weights_of(mlp.branch),
    )


# ----- installing plans ---------------------------------------------------------------------
def _spec(w: LinearWeights) -> dict:
    return linear_spec(w.bias is not None, w.rank)


def _fill(module: nn.Module, w: LinearWeights) -> None:
    with torch.no_grad():
        if isinstance(module, LowRankLinear):
            module.down.weight.copy_(w.down)
            module.up.weight.copy_(w.up)
        else:
            module.weight.copy_(w.weight)
        if w.bias is not None:
            module.bias.copy_(w.bias)


def _check(name: str, w: LinearWeights, out_features: int, in_features: int) -> None:
    if (w.out_features, w.in_features) != (out_features, in_features):
        raise ValueError(
            f"plan's {name} is [{w.out_features}, {w.in_features}], expected [{out_features}, {in_features}]"
        )


def validate_attention_plan(plan: AttentionPlan, hidden: int) -> None:
    """Shapes must agree with each other; a plan that does not is a plugin bug."""
    heads = len(plan.head_to_kv)
    if heads and (min(plan.head_to_kv) < 0 or max(plan.head_to_kv) >= plan.num_kv_heads):
        raise ValueError(f"head_to_kv {plan.head_to_kv} out of range for {plan.num_kv_heads} KV heads")
    if heads and set(plan.head_to_kv) != set(range(plan.num_kv_heads)):
        raise ValueError("every KV head must be read by at least one query head (drop unused KV heads)")
    pairs = plan.rope_index.shape[1] if plan.rope_index.ndim == 2 else 0
    if plan.rope_index.shape[0] != plan.num_kv_heads or 2 * pairs > plan.qk_dim:
        raise ValueError(f"rope_index {tuple(plan.rope_index.shape)} does not fit {plan.num_kv_heads} KV heads x qk_dim {plan.qk_dim}")
    _check("q", plan.q, heads * plan.qk_dim, hidden)
    _check("k", plan.k, plan.num_kv_heads * plan.qk_dim, hidden)
    _check("v", plan.v, plan.num_kv_heads * plan.v_dim, hidden)
    _check("o", plan.o, hidden, heads * plan.v_dim)


def build_attention(model: PrunedForCausalLM, index: int, plan: AttentionPlan) -> tuple[PrunedAttention, dict]:
    """A new attention module for layer ``index`` holding the plan's tensors, and its spec."""
    validate_attention_plan(plan, model.config.hidden_size)
    param = next(model.model.layers[index].self_attn.parameters())
    spec = dict(model.config.layers[index]["attn"])
    spec.update(
        head_to_kv=list(map(int, plan.head_to_kv)),
        num_kv_heads=int(plan.num_kv_heads),
        qk_dim=int(plan.qk_dim),
        v_dim=int(plan.v_dim),
        rope_pairs=int(plan.rope_index.shape[1]) if plan.rope_index.ndim == 2 else 0,
        q=_spec(plan.q), k=_spec(plan.k), v=_spec(plan.v), o=_spec(plan.o),
    )
    new = PrunedAttention(model.config, spec, index).to(device=param.device, dtype=param.dtype)
    for name in "qkvo":
        _fill(getattr(new, f"{name}_proj"), getattr(plan, name))
    with torch.no_grad():
        new.rope_index.copy_(plan.rope_index.reshape(new.rope_index.shape))
    return new, spec


def build_mlp(model: PrunedForCausalLM, index: int, plan: MLPPlan) -> tuple[PrunedMLP, dict]:
    """A new MLP module for layer ``index`` holding the plan's tensors, and its spec."""
    hidden, inter = model.config.hidden_size, plan.intermediate
    _check("gate", plan.gate, inter, hidden)
    _check("up", plan.up, inter, hidden)
    _check("down", plan.down, hidden, inter)
    if plan.branch is not None:
        _check("branch", plan.branch, hidden, hidden)
        if plan.branch.rank is None:
            raise ValueError("the MLP branch must be a low-rank factor pair")
    param = next(model.model.layers[index].mlp.parameters(), None)
    ref = param if param is not None else model.model.embed_tokens.weight
    spec = dict(model.config.layers[index]["mlp"])
    spec.update(
        intermediate=int(inter), gate=_spec(plan.gate), up=_spec(plan.up), down=_spec(plan.down),
        branch_rank=None if plan.branch is None else plan.branch.rank,
    )
    new = PrunedMLP(model.config, spec).to(device=ref.device, dtype=ref.dtype)
    for name in ("gate", "up", "down"):
        _fill(getattr(new, f"{name}_proj"), getattr(plan, name))
    if plan.branch is not None:
        _fill(new.branch, plan.branch)
    return new, spec


def apply_attention_plan(model: PrunedForCausalLM, index: int, plan: AttentionPlan) -> None:
    """Replace layer ``index``'s attention by a new module built from the plan."""
    module, spec = build_attention(model, index, plan)
    model.model.layers[index].self_attn = module
    model.config.layers[index]["attn"] = spec


def apply_mlp_plan(model: PrunedForCausalLM, index: int, plan: MLPPlan) -> None:
    """Replace layer ``index``'s MLP by a new module built from the plan."""
    module, spec = build_mlp(model, index, plan)
    model.model.layers[index].mlp = module
    model.config.layers[index]["mlp"] = spec


# ----- plan-building operations -----------------------------------------------------------
def _dense(w: LinearWeights, what: str) -> torch.Tensor:
    if w.weight is None:
        raise ValueError(f"{what} is a low-rank factor pair; this operation needs a dense projection")
    return w.weight


def _rows(w: LinearWeights, idx: torch.Tensor, what: str) -> LinearWeights:
    return LinearWeights(weight=_dense(w, what)[idx].clone(), bias=None if w.bias is None else w.bias[idx].clone())


def _cols(w: LinearWeights, idx: torch.Tensor, what: str) -> LinearWeights:
    return LinearWeights(weight=_dense(w, what)[:, idx].clone(), bias=None if w.bias is None else w.bias.clone())


def _head_rows(heads: Sequence[int], dim: int) -> torch.Tensor:
    if not len(heads):
        return torch.zeros(0, dtype=torch.long)
    return (torch.as_tensor(heads, dtype=torch.long)[:, None] * dim + torch.arange(dim)).reshape(-1)


def keep_heads(plan: AttentionPlan, heads: Sequence[int]) -> AttentionPlan:
    """Keep the listed query heads (current indices); a KV head goes with its last reader.

    Groups may become uneven: head_to_kv is re-indexed, never assumed contiguous.
    """
    heads = sorted({int(h) for h in heads})
    kv_kept = sorted({plan.head_to_kv[h] for h in heads})
    kv_new = {g: i for i, g in enumerate(kv_kept)}
    q_rows, o_cols = _head_rows(heads, plan.qk_dim), _head_rows(heads, plan.v_dim)
    k_rows, v_rows = _head_rows(kv_kept, plan.qk_dim), _head_rows(kv_kept, plan.v_dim)
    return replace(
        plan,
        head_to_kv=[kv_new[plan.head_to_kv[h]] for h in heads],
        num_kv_heads=len(kv_kept),
        rope_index=plan.rope_index[torch.as_tensor(kv_kept, dtype=torch.long)].clone()
        if kv_kept else plan.rope_index[:0].clone(),
        q=_rows(plan.q, q_rows, "q"),
        k=_rows(plan.k, k_rows, "k"),
        v=_rows(plan.v, v_rows, "v"),
        o=_cols(plan.o, o_cols, "o"),
    )


def keep_qk_pairs(plan: AttentionPlan, pairs: torch.Tensor, keep_pass: Sequence[int] | None = None) -> AttentionPlan:
    """Keep rotary pairs per KV group: ``pairs[g]`` lists positions (0..n-1 in the current
    pair layout) kept for KV head g and all its query heads; every group keeps the same
    count so attention stays one tensor op. Pass-through channels are kept unless
    ``keep_pass`` lists the ones to keep. The kept pairs keep their original frequencies.
    """
    n = int(plan.rope_index.shape[1])
    pass_dim = plan.qk_dim - 2 * n
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    if pairs.ndim != 2 or pairs.shape[0] != plan.num_kv_heads:
        raise ValueError(f"pairs must be [num_kv_heads={plan.num_kv_heads}, kept], got {tuple(pairs.shape)}")
    keep_pass_t = torch.arange(pass_dim) if keep_pass is None else torch.as_tensor(keep_pass, dtype=torch.long)
    m = pairs.shape[1]

    def channels(g: int) -> torch.Tensor:  # positions inside one head, new order
        return torch.cat((pairs[g], pairs[g] + n, 2 * n + keep_pass_t))

    new_qk = 2 * m + keep_pass_t.numel()
    q_rows = torch.cat([h * plan.qk_dim + channels(g) for h, g in enumerate(plan.head_to_kv)]) if plan.head_to_kv else torch.zeros(0, dtype=torch.long)
    k_rows = torch.cat([g * plan.qk_dim + channels(g) for g in range(plan.num_kv_heads)]) if plan.num_kv_heads else torch.zeros(0, dtype=torch.long)
    rope = torch.stack([plan.rope_index[g, pairs[g]] for g in range(plan.num_kv_heads)]) if plan.num_kv_heads else plan.rope_index[:, :m]
    return replace(plan, qk_dim=new_qk, rope_index=rope, q=_rows(plan.q, q_rows, "q"), k=_rows(plan.k, k_rows, "k"))


def fuse_vo(plan: AttentionPlan, v_basis: torch.Tensor, o_map: torch.Tensor | None = None) -> AttentionPlan:
    """Compress v/o head dims with a per-KV-head basis.

    ``v_basis[g]`` is [v_dim, p]: the new v channels of KV head g are ``v @ v_basis[g]``
    (fused into v_proj rows). Every query head's output then lives in those p dims; the
    o_proj input is mapped back by ``o_map`` [H*p, H*v_dim] (old input ~= new input @
    o_map), fused into o_proj. Without ``o_map`` the block-diagonal transpose of the basis
    is used (exact when the basis is orthonormal and spans the head's outputs).
    """
    g_heads, v_old, p = v_basis.shape
    if g_heads != plan.num_kv_heads or v_old != plan.v_dim:
        raise ValueError(f"v_basis must be [{plan.num_kv_heads}, {plan.v_dim}, p], got {tuple(v_basis.shape)}")
    wv = _dense(plan.v, "v").reshape(g_heads, v_old, -1)
    basis = v_basis.to(dtype=wv.dtype, device=wv.device)
    new_v = torch.einsum("gvp,gvd->gpd", basis, wv).reshape(g_heads * p, -1)
    new_vb = None
    if plan.v.bias is not None:
        new_vb = torch.einsum("gvp,gv->gp", basis, plan.v.bias.reshape(g_heads, v_old)).reshape(-1)
    heads = len(plan.head_to_kv)
    if o_map is None:
        o_map = torch.block_diag(*[basis[g].T for g in plan.head_to_kv]) if heads else torch.zeros(0, 0)
    if tuple(o_map.shape) != (heads * p, heads * v_old):
        raise ValueError(f"o_map must be [{heads * p}, {heads * v_old}], got {tuple(o_map.shape)}")
    new_o = _dense(plan.o, "o") @ o_map.to(dtype=wv.dtype, device=wv.device).T
    return replace(
        plan,
        v_dim=p,
        v=LinearWeights(weight=new_v.contiguous(), bias=new_vb),
        o=LinearWeights(weight=new_o.contiguous(), bias=plan.o.bias),
    )


def keep_channels(plan: MLPPlan, channels: Sequence[int] | torch.Tensor) -> MLPPlan:
    """Keep the listed FFN intermediate channels (gate/up rows, down columns)."""
    idx = torch.as_tensor(channels, dtype=torch.long).sort().values
    return replace(
        plan,
        gate=_rows(plan.gate, idx, "gate"),
        up=_rows(plan.up, idx, "up"),
        down=_cols(plan.down, idx, "down"),
    )

