"""What a hook sees: the run (model, calibration, caches) and, in the layer loop, one layer.

``LayerContext.collect`` is how components get statistics: it runs the layer's
calibration inputs (the outputs of the already-compressed layers before it) through the
layer with forward hooks and returns streamed moments per site. Results are cached until
the layer changes, so the attention and FFN components of one recipe share a pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunebench.harness.contracts import Allocation, AttentionPlan, Importance, MLPPlan, ModelShape
from prunebench.harness.params import model_shape
from prunebench.harness.pruned_model import PrunedDecoderLayer, PrunedForCausalLM
from prunebench.harness.stats import SITES, Moments
from prunebench.harness.surgery import build_attention, build_mlp


class LayerResidency:
    """Where the decoder layers live while pruning. This base class: all in memory, so
    acquiring and releasing a layer do nothing. ``prunebench.harness.offload.DiskLayers`` keeps them
    on disk and makes one real at a time; code that walks the layers of the whole model
    (the layer loop, streamed importance) goes through ``use`` and works with both."""

    offloaded: bool = False

    def acquire(self, model: PrunedForCausalLM, index: int) -> nn.Module:
        """Make layer ``index`` of ``model`` real (on the run's device) and return it."""
        return model.model.layers[index]

    def release(self, model: PrunedForCausalLM, index: int, changed: bool = False) -> None:
        """Done with layer ``index``; ``changed`` means it was compressed and must be kept."""

    def stash(self, key: str, tensors: list[torch.Tensor]) -> Any:
        """Keep activations for later (e.g. every layer's inputs for a streamed backward);
        returns a handle for ``unstash``. Here: kept as they are, in memory."""
        return tensors

    def unstash(self, handle: Any) -> list[torch.Tensor]:
        """The stashed activations (each handle is read once)."""
        return handle

    @contextmanager
    def use(self, model: PrunedForCausalLM, index: int, changed: bool = False) -> Iterator[nn.Module]:
        layer = self.acquire(model, index)
        try:
            yield layer
        finally:
            self.release(model, index, changed)


@dataclass
class RunContext:
    """The run as hooks see it. ``cache_parts`` identify everything that determines a
    method-independent result (model fingerprint, data spec, seed, sequence length), so a
    plugin's cache key built from them is shared across methods and sparsities."""

    model: PrunedForCausalLM
    calibration: torch.Tensor  # [N, L] token ids
    batch_size: int
    device: torch.device
    seed: int
    target: float
    cache_parts: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str, int], Any] | None = None
    use_cache: bool = True
    residency: LayerResidency = field(default_factory=LayerResidency)

    def shape(self) -> ModelShape:
        return model_shape(self.model)

    def batches(self) -> Iterable[torch.Tensor]:
        """Calibration token ids in batches, on the run's device."""
        for start in range(0, self.calibration.shape[0], self.batch_size):
            yield self.calibration[start : start + self.batch_size].to(self.device)


def position_ids(seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seqlen, device=device)[None]


@torch.no_grad()
def embed(model: PrunedForCausalLM, ids: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Inputs of the first decoder layer for every calibration sequence, [N, L, d]."""
    out = [model.model.embed_tokens(ids[s : s + batch_size].to(device)) for s in range(0, ids.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def run_layer(layer: nn.Module, model: PrunedForCausalLM, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One decoder layer over all calibration inputs (batched, causal, no padding)."""
    freqs = model.model.rotary_freqs(position_ids(hidden.shape[1], hidden.device))
    out = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], batch_size):
        out[s : s + batch_size] = layer(hidden[s : s + batch_size], freqs)
    return out


def _site_hooks(layer: PrunedDecoderLayer) -> dict[str, tuple[nn.Module, str, Callable]]:
    """site -> (module, 'pre' | 'post', how to pick the tensor from the hook's arguments)."""
    attn, mlp = layer.self_attn, layer.mlp
    first_arg = lambda args, out: args[0]
    output = lambda args, out: out
    return {
        "layer_in": (layer, "pre", first_arg),
        "attn_in": (attn, "pre", first_arg),
        "q_out": (attn.q_proj, "post", output),
        "k_out": (attn.k_proj, "post", output),
        "v_out": (attn.v_proj, "post", output),
        "o_in": (attn.o_proj, "pre", first_arg),
        "attn_out": (attn, "post", output),
        "mid": (layer.post_attention_layernorm, "pre", first_arg),
        "mlp_in": (mlp, "pre", first_arg),
        "down_in": (mlp.down_proj, "pre", first_arg),
        "mlp_out": (mlp, "post", output),
        "layer_out": (layer, "post", output),
    }


ATTENTION_SITES = ("layer_in", "attn_in", "q_out", "k_out", "v_out", "o_in", "attn_out")
"""Sites computed before the MLP: collecting only these need not run the rest of the layer."""


class _LayerStopped(Exception):
    """Raised by a hook to end a layer's forward once the requested statistics are taken."""


def _stop_layer(module: nn.Module, args: Any, output: Any) -> None:
    raise _LayerStopped


def _normalise(sites: Mapping[str, bool] | Iterable[str]) -> dict[str, bool]:
    wanted = dict(sites) if isinstance(sites, Mapping) else dict.fromkeys(sites, False)
    unknown = set(wanted) - set(SITES)
    if unknown:
        raise ValueError(f"unknown statistics site(s) {sorted(unknown)}; valid: {', '.join(SITES)}")
    return wanted


class LayerContext:
    """One layer of the layer loop, with its calibration inputs and the global-stage results."""

    def __init__(
        self,
        run: RunContext,
        index: int,
        inputs: torch.Tensor,
        importance: Importance | None,
        allocation: Allocation,
    ) -> None:
        self.run = run
        self.index = index
        self.inputs = inputs
        self.importance = importance
        self.allocation = allocation
        self._cache: dict[str, Moments] = {}
        self._version = -1

    @property
    def model(self) -> PrunedForCausalLM:
        return self.run.model

    @property
    def layer(self) -> PrunedDecoderLayer:
        return self.model.model.layers[self.index]

    def _state(self) -> int:
        # Surgery replaces modules, so module identity tells whether cached stats are stale.
        return hash((id(self.layer.self_attn), id(self.layer.mlp)))

    def trial_layer(self, attention: AttentionPlan | None = None, mlp: MLPPlan | None = None) -> PrunedDecoderLayer:
        """A copy of the layer with plans installed, for components that must see the
        effect of a partial plan (e.g. v/o statistics after q/k pairs are cut)."""
        layer = copy.deepcopy(self.layer)
        if attention is not None:
            layer.self_attn = build_attention(self.model, self.index, attention)[0]
        if mlp is not None:
            layer.mlp = build_mlp(self.model, self.index, mlp)[0]
        return layer

    @torch.no_grad()
    def _run_with_hooks(self, layer: PrunedDecoderLayer, sites: Iterable[str], sink: Callable[[str, torch.Tensor], None]) -> None:
        sites = list(sites)
        table = _site_hooks(layer)
        handles = []
        for site in sites:
            module, when, pick = table[site]
            if when == "pre":
                handles.append(module.register_forward_pre_hook(lambda m, a, s=site, p=pick: sink(s, p(a, None))))
            else:
                handles.append(module.register_forward_hook(lambda m, a, o, s=site, p=pick: sink(s, p(a, o))))
        # Statistics of the attention half only: stop each batch once attention has run
        # (registered last, so the sinks of the same module fire first). The MLP is most of
        # a layer's cost, and attention compressors collect before the MLP is touched.
        stop_early = bool(sites) and set(sites) <= set(ATTENTION_SITES)
        if stop_early:
            handles.append(layer.self_attn.register_forward_hook(_stop_layer))
        try:
            if stop_early:
                freqs = self.model.model.rotary_freqs(position_ids(self.inputs.shape[1], self.inputs.device))
                for s in range(0, self.inputs.shape[0], self.run.batch_size):
                    with suppress(_LayerStopped):
                        layer(self.inputs[s : s + self.run.batch_size], freqs)
            else:
                run_layer(layer, self.model, self.inputs, self.run.batch_size)
        finally:
            for h in handles:
                h.remove()

    def collect(
        self,
        sites: Mapping[str, bool] | Iterable[str],
        attention: AttentionPlan | None = None,
        mlp: MLPPlan | None = None,
    ) -> dict[str, Moments]:
        """Moments of the requested sites (``{site: want_gram}``) over the calibration inputs.

        With ``attention``/``mlp`` plans, the statistics are taken on a trial copy of the
        layer with those plans installed (nothing is cached then).
        """
        wanted = _normalise(sites)
        trial = attention is not None or mlp is not None
        if not trial and self._version != self._state():
            self._cache, self._version = {}, self._state()
        cache = {} if trial else self._cache
        missing = {s: g for s, g in wanted.items() if s not in cache or (g and cache[s].gram is None)}
        if missing:
            fresh: dict[str, Moments] = {}

            def sink(site: str, x: torch.Tensor) -> None:
                if site not in fresh:
                    fresh[site] = Moments.empty(x.shape[-1], missing[site], x.device)
                fresh[site].update(x)

            layer = self.trial_layer(attention, mlp) if trial else self.layer
            self._run_with_hooks(layer, missing, sink)
            for site in missing:
                cache[site] = fresh.get(site) or Moments.empty(0, missing[site])
        return {s: cache[s] for s in wanted}

    def release_statistics(self) -> None:
        """Drop the cached moments of this layer (a later ``collect`` recomputes them).

        For a component that has taken what it needs from the statistics and is about to
        start a memory-heavy step: the float64 Gram matrices of a wide layer (D^2 x 8 B for
        down_proj's input) otherwise stay resident until the layer is done.
        """
        self._cache, self._version = {}, -1

    def capture(
        self, site: str, max_tokens: int | None = None, layer: nn.Module | None = None, positions: str = "first"
    ) -> torch.Tensor:
        """Raw activations of one site, [tokens, dim] in float32, for methods that fit on
        samples (iterative PCA, linear calibration). Takes ``max_tokens // N`` positions of
        each of the N sequences, so memory stays bounded, rows ordered by sequence:
        ``positions="first"`` the first ones (BOS and attention-sink tokens included);
        ``"random"`` distinct positions drawn per sequence (ascending within it) from a
        generator seeded by the run's seed and the layer index, so a run is repeatable
        and every layer sees other positions."""
        _normalise([site])
        if positions not in ("first", "random"):
            raise ValueError(f"capture positions must be 'first' or 'random', got {positions!r}")
        chunks: list[torch.Tensor] = []
        n_seq, length = self.inputs.shape[0], self.inputs.shape[1]
        per_seq = None if max_tokens is None else max(1, max_tokens // n_seq)
        table = None
        if per_seq is not None and positions == "random" and per_seq < length:
            gen = torch.Generator().manual_seed((int(self.run.seed) * 1_000_003 + int(self.index)) % (2**63))
            table = torch.stack([torch.randperm(length, generator=gen)[:per_seq].sort().values for _ in range(n_seq)])
        seen = 0

        def sink(_: str, x: torch.Tensor) -> None:
            nonlocal seen
            if table is not None:
                rows = table[seen : seen + x.shape[0]].to(x.device)
                x = x[torch.arange(x.shape[0], device=x.device)[:, None], rows]
            elif per_seq is not None:
                x = x[:, :per_seq]
            seen += x.shape[0]
            chunks.append(x.reshape(-1, x.shape[-1]).to(torch.float32))

        self._run_with_hooks(layer if layer is not None else self.layer, [site], sink)
        return torch.cat(chunks)

    def outputs(self) -> torch.Tensor:
        """The layer's outputs for all calibration inputs (the next layer's inputs)."""
        return run_layer(self.layer, self.model, self.inputs, self.run.batch_size)
