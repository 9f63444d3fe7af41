"""Tiny random source models of every supported family, for tests and quick checks.

They exercise the same code paths as real models (MHA, GQA, q/k/v biases, Phi-3's fused
projections, partial rotary) in milliseconds. Weights are seeded, and the norms get
non-trivial scales so that norm-fusion bugs cannot hide behind weights of 1.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_KINDS = ("llama-mha", "llama-gqa", "llama-bias", "qwen2", "phi3", "phi3-partial")


def tiny_model(kind: str = "llama-gqa", seed: int = 0, vocab_size: int = 96, layers: int = 2) -> PreTrainedModel:
    """A seeded random model: hidden 64, 4 query heads of dim 16, intermediate 96."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(TINY_KINDS)}")
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    if kind == "llama-mha":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    elif kind == "llama-gqa":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "llama-bias":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, attention_bias=True, mlp_bias=True, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    elif kind == "phi3":
        model = Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, pad_token_id=0, **common))
    else:
        model = Phi3ForCausalLM(
            Phi3Config(num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5, **common)
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def fake_result(spec: Any, ppl: float | dict[str, float], window_nll: dict[str, list[float]] | None = None,
                host: Any = None, zeroshot: float | None = None, seconds: float = 12.0) -> dict[str, Any]:
    """A schema-2 result of ``spec`` as a run would write it, without running anything:
    for tests of grids, stores and reports. ``ppl`` per source (or one value for the
    profile's first source); ``window_nll`` per source gives the per-window NLLs (summed,
    each window predicting ``eval_seqlen - 1`` tokens), else they are derived from ``ppl``."""
    import math

    from prunebench.harness.session import RunSession

    session = RunSession(spec, host=host, show_progress=False)
    sources = list(session.profile.eval_sources)
    ppl = {sources[0]: ppl} if isinstance(ppl, int | float) else dict(ppl)
    seqlen = session.profile.eval_seqlen
    windows = window_nll or {s: [math.log(v) * (seqlen - 1)] * 4 for s, v in ppl.items()}
    pruned: dict[str, Any] = {"ppl": ppl, "ppl_windows": windows}
    dense: dict[str, Any] = {"ppl": dict.fromkeys(ppl, 20.0), "ppl_windows": {s: [math.log(20.0) * (seqlen - 1)] * 4 for s in ppl}}
    if zeroshot is not None:
        pruned["zeroshot"] = {"scores": {"arc_easy": zeroshot}, "average": zeroshot,
                              "tasks": {"arc_easy": {"stderr": 0.05}}}
        dense["zeroshot"] = {"scores": {"arc_easy": 0.5}, "average": 0.5, "tasks": {"arc_easy": {"stderr": 0.05}}}
    target = spec.sparsity
    return {
        "schema": 2, "kind": "run", "cell": session.cell,
        "spec": {**spec.to_dict(), "protocol": session.protocol, "protocol_id": session.protocol_id},
        "recipe": session.recipe.to_dict() | {"name": session.recipe.name},
        "sparsity": {"target": target, "achieved": (target or 0.0) + 0.001, "set_by": "target", "spent": None,
                     "allocation_target": target, "paper_count": None},
        "params": {"dense": {"decoder": 100}, "pruned": {"decoder": 70}},
        "metrics": {"dense": dense, "pruned": pruned},
        "timings": {"stages_s": {"prune": seconds}},
        "memory": {"peak_rss_mb": 1000.0},
        "pruning": {}, "tuning": None, "environment": {},
    }
