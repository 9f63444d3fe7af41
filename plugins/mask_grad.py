"""Mask-gradient importance for IntraSlice's global ratios (paper section 3.3, Eqs. 9-11).

``mask-grad`` (Eqs. 9-10): every input channel of ``o_proj`` (all head channels) and of
``down_proj`` (all intermediate channels) gets a mask m = 1, applied by a forward
pre-hook that multiplies the projection's input by m. The language-model loss (mean
next-token cross-entropy) is back-propagated over each calibration batch b; only the
masks require gradients, so no weight gradient is ever allocated. The importance of
channel i is the Fisher-style sum over batches of its squared mask gradient,

    I_i = sum_b (dL_b / dm_i)^2            (accumulated in float64).

``mask-grad-pca`` (Eq. 11) measures the same thing in the basis the compressors keep:
IntraSlice compresses a head (and the FFN, block by block) onto principal components of
its activations, so the unit that survives is a component, not a channel. With Q_s the
block-diagonal PCA basis of the same activations (eigenvectors of the uncentred second
moment X_s^T X_s of each block, eigenvalues descending, damped), the gradient of a mask
on component j is (g Q_s)_j, and

    I_j = sum_b ((g_b Q_s)_j)^2 = (Q_s^T G Q_s)_jj,   G = sum_b g_b^T g_b (per block).

Accumulating the block Gram G of the gradients is exactly Eq. 11 without storing
per-batch gradients or a second pass: the activation Grams X^T X are gathered in the
same forward passes. Blocks are the heads (``v_dim`` channels each) for attention and
fixed-size blocks of the intermediate dimension for the FFN (``ffn_block``; a last,
shorter block takes the remainder).

What a consumer gets (``ChannelImportance``, an ``Importance``):
* ``attention[l]``: one score per query head = the sum of its channel (or component)
  scores. A head's sum is rotation invariant, so it is the same in both bases.
* ``mlp[l]``: one score per intermediate unit: per channel for ``mask-grad``; per PCA
  component for ``mask-grad-pca`` (component j of block k at index k*ffn_block + j,
  eigenvalue-descending within a block; ``meta["basis"] == "pca"``). These are *not*
  channel scores then: use them for allocation, not to pick channels.
* ``attention_channels[l]``: the channel/component-level attention scores (H * v_dim),
  used by the ``global`` allocator. Kept out of ``meta`` on purpose: ``meta`` is written
  into every result file, and 30 x 576 floats per run would bloat them.

Departures from the reference code (Asker0Lee/IntraSlice, ``global_prune_rate``):
* The reference squares the *sum* of a head's (rotated) channel gradients (a head-mask
  gradient); here a head's score is the sum of its squared channel scores, as the
  issue specifies, and the allocator ranks channels/components, so the PCA correction
  is not lost by the rotation invariance of a head's sum of squares.
* The reference sums the gradients of 8 batches before squaring; here every batch of
  ``run.batch_size`` sequences is one gradient sample (the loss is already the mean
  over its sequences).
* The reference leaves the FFN gradients unrotated (its FFN PCA is commented out); the
  issue asks for FFN blocks, so ``ffn_block=0`` reproduces the reference (no FFN PCA).
* Memory: layers run under activation checkpointing and the vocabulary projection plus
  cross-entropy runs in token chunks, so the graph never holds more than one layer's
  activations and one chunk of logits (see ``checkpoint`` and ``loss_chunk``).

Results are cached (``prunebench.harness.cache``) under a key of ``run.cache_parts`` (model
fingerprint, data spec, seed, sequence length), the component and its parameters, the
batch size, a digest of the calibration ids and a cheap fingerprint of the weights, so a
grid of methods and sparsities computes them once; ``run.use_cache=False`` disables it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunebench.harness.cache import stable_key, torch_cache_get, torch_cache_put
from prunebench.harness.components import Component
from prunebench.harness.context import RunContext, position_ids
from prunebench.harness.contracts import Importance
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.pruned_model import PrunedForCausalLM
from prunebench.harness.results import peak_rss_mb

CACHE_KIND = "mask-grad"
CACHE_VERSION = 1
"""Bump when the computation changes, so old cache entries are never reused."""
MEMORY_ONLY_PARAMS = frozenset({"checkpoint", "loss_chunk"})
"""Parameters that trade memory for time without changing the scores: not in the key."""


@dataclass
class ChannelImportance(Importance):
    """``Importance`` plus channel/component-level attention scores for the allocator."""

    attention_channels: list[torch.Tensor] = field(default_factory=list)


# ----- block second moments ---------------------------------------------------------------
class BlockMoments:
    """Sum over samples of z_k^T z_k for consecutive blocks z_k of a vector (float64).

    The width splits into ``width // block`` full blocks and one shorter remainder block;
    products are formed in float32 per update and added to float64 accumulators.
    """

    def __init__(self, width: int, block: int, device: torch.device | str = "cpu") -> None:
        self.width = int(width)
        self.block = max(1, min(int(block), self.width)) if self.width else 1
        self.n_full = self.width // self.block
        self.rest = self.width - self.n_full * self.block
        self.full = torch.zeros(self.n_full, self.block, self.block, dtype=torch.float64, device=device)
        self.tail = torch.zeros(self.rest, self.rest, dtype=torch.float64, device=device)

    def update(self, z: torch.Tensor) -> None:
        z = z.detach().reshape(-1, self.width)
        z = z if z.dtype == torch.float64 else z.to(torch.float32)
        cut = self.n_full * self.block
        if self.n_full:
            blocks = z[:, :cut].reshape(-1, self.n_full, self.block).transpose(0, 1)  # [k, n, b]
            self.full += (blocks.transpose(1, 2) @ blocks).to(torch.float64)
        if self.rest:
            tail = z[:, cut:]
            self.tail += (tail.T @ tail).to(torch.float64)

    def matrices(self) -> list[torch.Tensor]:
        """The blocks as a list of batched [k, b, b] tensors (full blocks, then the remainder)."""
        out = [self.full] if self.n_full else []
        return out + ([self.tail[None]] if self.rest else [])


def pca_bases(grams: torch.Tensor, damping: float) -> torch.Tensor:
    """Eigenvectors (columns, eigenvalues descending) of each damped block [k, b, b], float64.

    Damping (``damping`` x the block's mean diagonal) keeps dead or rank-deficient blocks
    well posed. If eigh still fails to converge, the damping grows tenfold (three times);
    after that the block keeps the channel basis (identity), i.e. plain mask-grad scores.
    """
    g = grams.to(torch.float64)
    g = 0.5 * (g + g.transpose(1, 2))
    diag_mean = g.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    lam = damping
    with _one_thread(g.device):
        for _ in range(4):
            try:
                _, vecs = torch.linalg.eigh(g + lam * diag_mean[:, None, None] * eye)
                return vecs.flip(-1)
            except RuntimeError:  # torch.linalg.LinAlgError: no convergence
                lam = max(lam * 10, 1e-6)
    return eye.expand_as(g).clone()


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run small CPU decompositions on one thread.

    The blocks are at most a few hundred wide, so threads buy nothing; and on a loaded
    machine MKL's threaded float64 eigh spin-waits (measured here: 33 s instead of 0.1 s
    for 12 blocks of 128 with two threads under a load of 12, unless OMP_WAIT_POLICY=PASSIVE).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rotated_scores(grad_moments: BlockMoments, act_moments: BlockMoments, damping: float) -> torch.Tensor:
    """diag(Q_s^T G Q_s) per block, concatenated: Eq. 11's sum_b ((g_b Q_s)_j)^2."""
    parts = []
    for g, a in zip(grad_moments.matrices(), act_moments.matrices()):
        q = pca_bases(a, damping)
        parts.append(((g @ q) * q).sum(1).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


# ----- the masked forward and loss ------------------------------------------------------------
def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    logits = lm_head(hidden)
    return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, labels, reduction="sum")


def causal_lm_loss(
    model: PrunedForCausalLM, ids: torch.Tensor, use_checkpoint: bool = True, loss_chunk: int = 512
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (the same value as ``model(ids, labels=ids).loss``).

    Written out rather than calling ``model(...)`` so that each decoder layer can run under
    activation checkpointing and the vocabulary projection can run in token chunks: the
    autograd graph then holds one layer's activations and one chunk of logits at a time.
    """
    inner = model.model
    hidden = inner.embed_tokens(ids)
    freqs = inner.rotary_freqs(position_ids(ids.shape[1], ids.device))
    for layer in inner.layers:
        if use_checkpoint and torch.is_grad_enabled():
            hidden = checkpoint(layer, hidden, freqs, None, None, use_reentrant=False)
        else:
            hidden = layer(hidden, freqs, None, None)
    return head_loss(model, hidden, ids, use_checkpoint, loss_chunk)


def head_loss(
    model: PrunedForCausalLM, hidden: torch.Tensor, ids: torch.Tensor, use_checkpoint: bool = True, loss_chunk: int = 512
) -> torch.Tensor:
    """Mean next-token cross-entropy from the last layer's outputs (final norm, lm_head),
    the vocabulary projection in token chunks."""
    hidden = model.model.norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
    labels = ids[:, 1:].reshape(-1)
    step = max(1, int(loss_chunk)) if loss_chunk else labels.numel()
    total = hidden.new_zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    for s in range(0, labels.numel(), step):
        h, y = hidden[s : s + step], labels[s : s + step]
        if use_checkpoint and torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, y, model.lm_head, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, y, model.lm_head)
    return total / max(labels.numel(), 1)


class ChannelMasks:
    """All-ones masks on the inputs of every layer's ``o_proj`` and ``down_proj``.

    Installed as forward pre-hooks that return ``(x * mask,)``; the masks are the only
    tensors that require gradients. ``observe`` (when set) sees each masked input's raw
    activations during the forward pass, for the PCA statistics; it is switched off with
    ``observing = False`` before backward, so checkpoint recomputation does not count
    tokens twice.
    """

    def __init__(
        self,
        model: PrunedForCausalLM,
        observe: Callable[[str, int, torch.Tensor], None] | None = None,
        layers: Sequence[int] | None = None,
    ) -> None:
        self.model = model
        self.layers = list(range(len(model.model.layers))) if layers is None else list(layers)
        self.observe = observe
        self.observing = False
        self.attention: list[torch.Tensor] = []
        self.mlp: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> Self:
        for index in self.layers:
            layer = self.model.model.layers[index]
            attn, mlp = layer.self_attn, layer.mlp
            dtype = next(attn.o_proj.parameters()).dtype
            device = next(attn.o_proj.parameters()).device
            a = torch.ones(attn.num_heads * attn.v_dim, dtype=dtype, device=device, requires_grad=True)
            m = torch.ones(mlp.intermediate, dtype=dtype, device=device, requires_grad=True)
            self.attention.append(a)
            self.mlp.append(m)
            self._handles.append(attn.o_proj.register_forward_pre_hook(self._hook("attention", index, a)))
            self._handles.append(mlp.down_proj.register_forward_pre_hook(self._hook("mlp", index, m)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, site: str, index: int, mask: torch.Tensor) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if self.observing and self.observe is not None:
                self.observe(site, index, x.detach())
            return (x * mask,) + tuple(args[1:])

        return hook

    def all(self) -> list[torch.Tensor]:
        return self.attention + self.mlp


class frozen_weights:
    """Context manager: every parameter of ``model`` has ``requires_grad=False`` inside.

    Only the masks get gradients, so backward never allocates a weight-sized gradient;
    the previous flags are restored on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> nn.Module:
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)


# ----- accumulation over calibration batches --------------------------------------------------
class _Accumulator:
    """Per-layer float64 accumulators: squared gradients, or block Grams of gradients and
    activations when a PCA basis is wanted for that site."""

    def __init__(self, widths: Sequence[tuple[int, int, int]], pca: bool, ffn_block: int, device: torch.device) -> None:
        """``widths``: per layer (attention mask width, v_dim, FFN mask width)."""
        self.pca_attention = pca
        self.pca_mlp = pca and ffn_block > 0
        self.sq = {"attention": [torch.zeros(a, dtype=torch.float64, device=device) for a, _, _ in widths],
                   "mlp": [torch.zeros(m, dtype=torch.float64, device=device) for _, _, m in widths]}
        self.grad_blocks: dict[str, list[BlockMoments]] = {"attention": [], "mlp": []}
        self.act_blocks: dict[str, list[BlockMoments]] = {"attention": [], "mlp": []}
        for a, v, m in widths:
            if self.pca_attention:
                self.grad_blocks["attention"].append(BlockMoments(a, max(v, 1), device))
                self.act_blocks["attention"].append(BlockMoments(a, max(v, 1), device))
            if self.pca_mlp:
                self.grad_blocks["mlp"].append(BlockMoments(m, ffn_block, device))
                self.act_blocks["mlp"].append(BlockMoments(m, ffn_block, device))

    @classmethod
    def for_model(cls, model: PrunedForCausalLM, pca: bool, ffn_block: int, device: torch.device) -> Self:
        """Sizes read from the modules (works on meta layers too: only shapes are used)."""
        widths = [(l.self_attn.num_heads * l.self_attn.v_dim, l.self_attn.v_dim, l.mlp.intermediate) for l in model.model.layers]
        return cls(widths, pca, ffn_block, device)

    def observe(self, site: str, index: int, x: torch.Tensor) -> None:
        if self.act_blocks[site]:
            self.act_blocks[site][index].update(x)

    def add_gradients(self, site: str, grads: Sequence[torch.Tensor | None]) -> None:
        for index, g in enumerate(grads):
            self.add_gradient(site, index, g)

    def add_gradient(self, site: str, index: int, g: torch.Tensor | None) -> None:
        if g is None or g.numel() == 0:  # a layer with no heads/channels left
            return
        g = g.detach().to(torch.float64)
        self.sq[site][index] += g.pow(2)
        if self.grad_blocks[site]:
            self.grad_blocks[site][index].update(g[None])

    def scores(self, site: str, damping: float) -> list[torch.Tensor]:
        if not self.grad_blocks[site]:
            return [s.cpu() for s in self.sq[site]]
        return [
            rotated_scores(g, a, damping).cpu() if g.width else torch.zeros(0, dtype=torch.float64)
            for g, a in zip(self.grad_blocks[site], self.act_blocks[site])
        ]


def mask_importance(
    model: PrunedForCausalLM,
    batches: Callable[[], Any],
    *,
    pca: bool,
    ffn_block: int = 128,
    damping: float = 0.01,
    use_checkpoint: bool = True,
    loss_chunk: int = 512,
    progress: Callable[[str, int], Any] | None = None,
) -> ChannelImportance:
    """Back-propagate the LM loss of every calibration batch to the channel masks and
    turn the gradients into scores (see the module docstring for the formulas)."""
    start = time.perf_counter()
    losses: list[float] = []
    tokens = 0
    with frozen_weights(model), ChannelMasks(model) as masks, torch.enable_grad():
        acc = _Accumulator.for_model(model, pca, int(ffn_block), masks.attention[0].device if masks.attention else torch.device("cpu"))
        masks.observe = acc.observe
        params = masks.all()
        for step, ids in enumerate(batches()):
            masks.observing = True
            loss = causal_lm_loss(model, ids, use_checkpoint, loss_chunk)
            masks.observing = False
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite calibration loss in batch {step}: {loss.item()}")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            acc.add_gradients("attention", grads[: len(masks.attention)])
            acc.add_gradients("mlp", grads[len(masks.attention) :])
            losses.append(float(loss.detach()))
            tokens += ids.shape[0] * max(ids.shape[1] - 1, 0)
            if progress is not None:
                progress("mask gradients", step + 1)
    return _importance(acc, model, damping, losses, tokens, start, pca, ffn_block)


def _importance(
    acc: _Accumulator, model: PrunedForCausalLM, damping: float, losses: list[float], tokens: int, start: float,
    pca: bool, ffn_block: int,
) -> ChannelImportance:
    channels = acc.scores("attention", damping)
    mlp = acc.scores("mlp", damping)
    heads = [
        c.reshape(layer.self_attn.num_heads, -1).sum(1) if c.numel() else torch.zeros(layer.self_attn.num_heads, dtype=torch.float64)
        for c, layer in zip(channels, model.model.layers)
    ]
    meta = {
        "basis": "pca" if pca else "channel",
        "mlp_basis": "pca" if acc.pca_mlp else "channel",
        "ffn_block": int(ffn_block) if acc.pca_mlp else None,
        "batches": len(losses),
        "tokens": tokens,
        "mean_loss": sum(losses) / max(len(losses), 1),
        "attention_total": [float(h.sum()) for h in heads],
        "mlp_total": [float(m.sum()) for m in mlp],
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
    }
    return ChannelImportance(attention=heads, mlp=mlp, meta=meta, attention_channels=channels)


def streamed_mask_importance(
    run: RunContext,
    *,
    pca: bool,
    ffn_block: int = 128,
    damping: float = 0.01,
    loss_chunk: int = 512,
    progress: Callable[[str, int], Any] | None = None,
) -> ChannelImportance:
    """``mask_importance`` with one decoder layer in memory at a time (``run.residency``).

    Layer-major instead of batch-major: every batch goes forward through layer 0, then
    layer 1, ... (each layer's inputs are kept), the loss of each batch gives the gradient
    at the last layer's output, and the layers are walked backwards, each recomputing its
    forward for every batch and passing the input gradient down. Batch b's loss depends
    on layer l's masks only through batch b's activations, so every per-batch mask
    gradient is the same as in the whole-model pass (up to float summation order), and
    the squares are summed per batch as there. Memory: all layers' inputs,
    layers x N x L x hidden in the compute dtype, plus one layer's weights.
    """
    start = time.perf_counter()
    model, residency = run.model, run.residency
    device = model.lm_head.weight.device
    batches = list(run.batches())
    n_layers = len(model.model.layers)
    acc = _Accumulator.for_model(model, pca, int(ffn_block), device)
    freqs = model.model.rotary_freqs(position_ids(batches[0].shape[1], device))
    with torch.no_grad():
        hidden = [model.model.embed_tokens(ids) for ids in batches]
    inputs: list[Any] = []
    for index in range(n_layers):
        with residency.use(model, index) as layer, torch.no_grad():
            inputs.append(residency.stash(f"mask-grad-inputs-{index}", hidden))
            hidden = [layer(h, freqs, None, None) for h in hidden]
    grads: list[torch.Tensor] = []
    losses: list[float] = []
    with torch.enable_grad(), frozen_weights(model):
        for step, (ids, h) in enumerate(zip(batches, hidden)):
            h = h.detach().requires_grad_(True)
            loss = head_loss(model, h, ids, True, loss_chunk)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite calibration loss in batch {step}: {loss.item()}")
            grads.append(torch.autograd.grad(loss, h)[0])
            losses.append(float(loss.detach()))
    for done, index in enumerate(reversed(range(n_layers))):
        with residency.use(model, index) as layer, frozen_weights(layer), \
                ChannelMasks(model, acc.observe, layers=[index]) as masks, torch.enable_grad():
            wanted_masks = [masks.attention[0], masks.mlp[0]]
            for b, x in enumerate(residency.unstash(inputs[index])):
                x = x.detach().requires_grad_(index > 0)
                masks.observing = True
                out = layer(x, freqs, None, None)
                masks.observing = False
                got = torch.autograd.grad(out, wanted_masks + ([x] if index > 0 else []), grad_outputs=grads[b],
                                          allow_unused=True)
                acc.add_gradient("attention", index, got[0])
                acc.add_gradient("mlp", index, got[1])
                if index > 0:
                    grads[b] = got[2]
        inputs[index] = None
        if progress is not None:
            progress("mask gradients (layers)", done + 1)
    tokens = sum(ids.shape[0] * max(ids.shape[1] - 1, 0) for ids in batches)
    imp = _importance(acc, model, damping, losses, tokens, start, pca, ffn_block)
    imp.meta["streamed"] = True
    return imp


# ----- caching ---------------------------------------------------------------------------------
def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of the calibration token ids (cheap: a few hundred KB)."""
    return hashlib.sha256(ids.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def weight_fingerprint(model: nn.Module) -> str:
    """A cheap digest of the current weights: per tensor its name, shape, and float64 sum
    and absolute sum rounded to 10 significant digits.

    ``run.cache_parts`` names the *source* model; a transform that ran before the
    importance stage (or any other edit) changes the weights, and must not hit the
    dense model's entry. Rounding keeps the digest stable across thread counts.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = float(torch.sum(p, dtype=torch.float64))
            a = float(torch.sum(p.abs(), dtype=torch.float64))
            h.update(f"{name}:{tuple(p.shape)}:{s:.10g}:{a:.10g};".encode())
    return h.hexdigest()


def cache_key(run: RunContext, component: str, params: dict[str, Any]) -> str | None:
    """The cache key of this run's scores, or None when caching is off.

    Off when ``run.use_cache`` is False or ``run.cache_parts`` is empty (then nothing
    identifies the data spec and seed, and a shared entry could be stale).
    """
    if not run.use_cache or not run.cache_parts:
        return None
    result_params = {k: v for k, v in params.items() if k not in MEMORY_ONLY_PARAMS}
    return stable_key(
        CACHE_KIND, CACHE_VERSION, component, dict(run.cache_parts), result_params,
        {"batch_size": int(run.batch_size), "calibration": ids_digest(run.calibration),
         "weights": weight_fingerprint(run.model)},
    )


def _to_cache(imp: ChannelImportance) -> dict[str, Any]:
    return {"attention": imp.attention, "mlp": imp.mlp, "attention_channels": imp.attention_channels, "meta": imp.meta}


def _from_cache(obj: dict[str, Any]) -> ChannelImportance:
    return ChannelImportance(
        attention=list(obj["attention"]), mlp=list(obj["mlp"]), meta=dict(obj["meta"]),
        attention_channels=list(obj["attention_channels"]),
    )


def cached_importance(run: RunContext, component: str, params: dict[str, Any], pca: bool) -> ChannelImportance:
    """Scores from the cache when present, else computed (and stored)."""
    key = cache_key(run, component, params)
    if key is not None:
        hit = torch_cache_get(CACHE_KIND, key)
        if hit is not None:
            imp = _from_cache(hit)
            imp.meta["cache"] = "hit"
            return imp
    if run.residency.offloaded:
        imp = streamed_mask_importance(
            run, pca=pca, ffn_block=int(params.get("ffn_block", 0)), damping=float(params.get("damping", 0.01)),
            loss_chunk=int(params["loss_chunk"]), progress=run.progress,
        )
    else:
        imp = mask_importance(
            run.model, run.batches, pca=pca, ffn_block=int(params.get("ffn_block", 0)),
            damping=float(params.get("damping", 0.01)), use_checkpoint=bool(params["checkpoint"]),
            loss_chunk=int(params["loss_chunk"]), progress=run.progress,
        )
    imp.meta["cache"] = "off" if key is None else "miss"
    if key is not None:
        torch_cache_put(CACHE_KIND, key, _to_cache(imp))
    return imp


# ----- the components ----------------------------------------------------------------------------
class MaskGrad(Component):
    """Fisher importance of o_proj/down_proj input channels: sum over batches of the squared LM-loss mask gradient."""

    kind, name = "importance", "mask-grad"
    streams_layers = True
    defaults: ClassVar[dict[str, Any]] = {"checkpoint": True, "loss_chunk": 512}

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> Importance:
        return cached_importance(run, self.name, params, pca=False)


class MaskGradPCA(Component):
    """Mask gradients rotated into block-diagonal PCA bases of the activations before squaring (IntraSlice Eq. 11)."""

    kind, name = "importance", "mask-grad-pca"
    streams_layers = True
    defaults: ClassVar[dict[str, Any]] = {"ffn_block": 128, "damping": 0.01, "checkpoint": True, "loss_chunk": 512}

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> Importance:
        return cached_importance(run, self.name, params, pca=True)


@hookimpl
def prunebench_components() -> list[Component]:
    return [MaskGrad(), MaskGradPCA()]
