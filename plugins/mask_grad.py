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
moment X_s^T X_s of each block, eigenvalues descending, damped), Eq. 11 as printed takes
(g Q_s)_j as the gradient of a mask on component j, and

    I_j = sum_b ((g_b Q_s)_j)^2 = (Q_s^T G Q_s)_jj,   G = sum_b g_b^T g_b (per block).

Accumulating the block Gram G of the gradients is exactly Eq. 11 without storing
per-batch gradients or a second pass: the activation Grams X^T X are gathered in the
same forward passes (``gradient="exact"`` below is the true gradient of such a mask).
Blocks are the heads (``v_dim`` channels each) for attention and fixed-size blocks of
the intermediate dimension for the FFN (``ffn_block``; a last, shorter block takes the
remainder).

What a consumer gets (``ChannelImportance``, an ``Importance``):
* ``attention[l]``: one score per query head: with ``head_score="channels"`` the sum of
  its channel (or component) scores, which is rotation invariant for Eq. 11 as printed
  (the same in both bases); with ``"summed"`` see the options below.
* ``mlp[l]``: one score per intermediate unit: per channel for ``mask-grad``; per PCA
  component for ``mask-grad-pca`` (component j of block k at index k*ffn_block + j,
  eigenvalue-descending within a block; ``meta["basis"] == "pca"``). These are *not*
  channel scores then: use them for allocation, not to pick channels.
* ``attention_channels[l]``: the channel/component-level attention scores (H * v_dim),
  used by the ``global`` allocator. Kept out of ``meta`` on purpose: ``meta`` is written
  into every result file, and 30 x 576 floats per run would bloat them.

Options (component parameters; the first value is the project's, which every existing
recipe keeps unless it names another):

* ``grad_group`` (both components): how many calibration sequences make one gradient
  sample. ``0`` (or ``"batch"``): one batch of ``run.batch_size`` sequences, whose loss is
  their mean. ``n > 0``: the gradients of n consecutive sequences, each with its own mean
  loss, are summed before squaring, as the authors' code does with n = 8 (a batch that
  straddles two samples is run in two parts; a last, shorter sample keeps the remainder,
  where the reference would need n to divide the sample count).
* ``head_score`` (both): ``"channels"``: a head's score is the sum of its channels' (or
  components') scores, sum_b sum_c g_bc^2. ``"summed"`` (the reference): the square of
  the head's summed channel gradient (a head-mask gradient), summed over samples,
  sum_b (sum_c g_bc)^2; with ``mask-grad-pca`` and ``gradient="printed"`` the summed
  components are the rotated ones, sum_b ((g_b Q_s) 1)^2, as the reference's PCA variant.
  It changes ``attention`` (per head) only; ``attention_channels`` stay per channel.
* ``gradient`` (``mask-grad-pca``): ``"printed"``: Eq. 11 as printed, (g Q_s)_j^2 with g
  the channel-mask gradient. ``"exact"``: the gradient of a mask placed *after* the
  rotation, x -> x Q_s diag(m) Q_s^T, which is g'_j = sum_t (x_t Q_s)_j (delta_t Q_s)_j
  = diag(Q_s^T X^T Delta Q_s)_j (delta = dL/dx), squared and summed over samples. The
  printed form rotates g, whose entries g_c = sum_t x_tc delta_tc have already summed
  the tokens channel by channel, so (g Q_s)_j = sum_c g_c Q_cj is not g'_j (the two agree
  only when Q_s is a permutation). The exact form needs Q_s first, so it
  takes the activation Grams in a forward-only pass, then runs the gradient pass with
  the rotated mask written as x + ((x Q_s) * m) Q_s^T at m = 0 (the forward is exactly
  the model's). Note: a head's *summed* exact gradient is rotation invariant
  (sum_j g'_j = sum_c g_c).
* ``attention_basis`` (``mask-grad-pca``): ``"head"``: each head's block is rotated by
  its own PCA basis (the reference). ``"kv-group"``: by its KV group's basis, the
  eigenvectors of the summed activation Grams of the group's heads, which is the basis
  the attention compressor really uses under GQA (identical to ``"head"`` under MHA).

Departures from the reference code (Asker0Lee/IntraSlice, ``global_prune_rate``), with
the parameters at the project's values (the ``intraslice`` recipe sets the reference's):
* head scores are the sum of squared channel scores (``head_score="channels"``), and the
  allocator ranks channels/components, so the PCA correction is not lost by the rotation
  invariance of a head's sum of squares;
* every batch of ``run.batch_size`` sequences is one gradient sample (``grad_group=0``);
* the reference leaves the FFN gradients unrotated (its FFN PCA is commented out); the
  issue asks for FFN blocks, so ``ffn_block=0`` reproduces the reference (no FFN PCA);
* the reference's PCA blocks are 128 channels whatever the head dim; here a block is a
  head (``v_dim`` channels);
* memory: layers run under activation checkpointing and the vocabulary projection plus
  cross-entropy runs in token chunks, so the graph never holds more than one layer's
  activations and one chunk of logits (see ``checkpoint`` and ``loss_chunk``).

Results are cached (``prunebench.harness.cache``) under a key of ``run.cache_parts`` (model
fingerprint, data spec, seed, sequence length), the component and its parameters, the
batch size, a digest of the calibration ids and a cheap fingerprint of the weights, so a
grid of methods and sparsities computes them once; ``run.use_cache=False`` disables it.
Every option above is in the key, except at its project value (``NEUTRAL_PARAMS``), so
entries computed before the options existed stay valid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunebench.harness.clock import peak_rss_mb
from prunebench.harness.component_cache import cached, run_cache_key
from prunebench.harness.components import Component
from prunebench.harness.context import RunContext, position_ids
from prunebench.harness.contracts import Importance
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.pruned_model import PrunedForCausalLM
from prunebench.plugins.block_pca import BlockMoments, group_grams, pca_bases, rotate_masked, scores_in_bases

CACHE_KIND = "mask-grad"
CACHE_VERSION = 1
"""Bump when the computation changes, so old cache entries are never reused."""
MEMORY_ONLY_PARAMS = frozenset({"checkpoint", "loss_chunk"})
"""Parameters that trade memory for time without changing the scores: not in the key."""
NEUTRAL_PARAMS: dict[str, Any] = {"grad_group": 0, "head_score": "channels", "gradient": "printed", "attention_basis": "head"}
"""Options at the value that gives the scores from before the option existed: left out of
the cache key at that value, so entries computed before the options were added stay valid."""
HEAD_SCORES = ("channels", "summed")
GRADIENTS = ("printed", "exact")
ATTENTION_BASES = ("head", "kv-group")


def group_size(value: Any) -> int:
    """``grad_group`` as an int: 0 for ``"batch"`` (one batch per gradient sample), else n."""
    if value == "batch":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"grad_group must be 'batch' or an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class GradOptions:
    """How mask gradients become scores (the module docstring's "Options")."""

    grad_group: int = 0
    head_score: str = "channels"
    gradient: str = "printed"
    attention_basis: str = "head"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], component: str = "mask-grad") -> GradOptions:
        """The options of a component's parameters (absent ones at the project's value), checked."""
        opts = cls(
            grad_group=group_size(params.get("grad_group", 0)),
            head_score=str(params.get("head_score", "channels")),
            gradient=str(params.get("gradient", "printed")),
            attention_basis=str(params.get("attention_basis", "head")),
        )
        for key, allowed in (("head_score", HEAD_SCORES), ("gradient", GRADIENTS), ("attention_basis", ATTENTION_BASES)):
            if getattr(opts, key) not in allowed:
                raise UsageError(f"{component}: {key}={getattr(opts, key)!r}; choose from {', '.join(allowed)}")
        return opts


@dataclass
class ChannelImportance(Importance):
    """``Importance`` plus channel/component-level attention scores for the allocator."""

    attention_channels: list[torch.Tensor] = field(default_factory=list)


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

    ``rotations(site, index)`` (when set) may return block bases for a site; that site's
    mask then sits after the rotation (``rotate_masked``: a zero vector, x + ((x Q) * m) Q^T),
    so its gradient is the exact gradient of a mask on each PCA component.
    """

    def __init__(
        self,
        model: PrunedForCausalLM,
        observe: Callable[[str, int, torch.Tensor], None] | None = None,
        layers: Sequence[int] | None = None,
        rotations: Callable[[str, int], Sequence[torch.Tensor] | None] | None = None,
    ) -> None:
        self.model = model
        self.layers = list(range(len(model.model.layers))) if layers is None else list(layers)
        self.observe = observe
        self.rotations = rotations
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
            for site, module, width, store in (("attention", attn.o_proj, attn.num_heads * attn.v_dim, self.attention),
                                               ("mlp", mlp.down_proj, mlp.intermediate, self.mlp)):
                bases = self.rotations(site, index) if self.rotations is not None else None
                if bases is None:
                    mask = torch.ones(width, dtype=dtype, device=device, requires_grad=True)
                    hook = self._hook(site, index, mask)
                else:
                    mask = torch.zeros(width, dtype=dtype, device=device, requires_grad=True)
                    hook = self._rotated_hook(mask, [q.to(device=device, dtype=dtype) for q in bases])
                store.append(mask)
                self._handles.append(module.register_forward_pre_hook(hook))
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

    @staticmethod
    def _rotated_hook(mask: torch.Tensor, bases: Sequence[torch.Tensor]) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            return (rotate_masked(args[0], mask, bases),) + tuple(args[1:])

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


# ----- gradient samples -----------------------------------------------------------------------
def gradient_samples(batches: Iterable[torch.Tensor], group: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(token ids, gradient sample index) of every backward pass, in calibration order.

    ``group = 0``: each batch is one sample. ``group = n``: sequence s belongs to sample
    s // n, and a batch that straddles two samples is cut in two, so that every backward
    pass feeds one sample only.
    """
    seen = 0
    for b, ids in enumerate(batches):
        if group <= 0:
            yield ids, b
            continue
        i = 0
        while i < ids.shape[0]:
            sample = (seen + i) // group
            end = min(int(ids.shape[0]), (sample + 1) * group - seen)
            yield ids[i:end], sample
            i = end
        seen += int(ids.shape[0])


def sample_loss(loss: torch.Tensor, ids: torch.Tensor, group: int) -> torch.Tensor:
    """The loss whose gradient a backward pass adds to its sample: the batch's mean loss
    (``group = 0``), else the sum of each sequence's own mean loss (the reference runs one
    sequence per backward and sums the gradients); sequences have equal lengths."""
    return loss if group <= 0 else loss * ids.shape[0]


class _SampleSums:
    """Sums the gradients of a sample's backward passes and hands each sample's sum to the
    accumulator once its last pass is done (``flush`` at the end)."""

    def __init__(self, acc: _Accumulator) -> None:
        self.acc = acc
        self.open: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}

    def add(self, site: str, index: int, sample: int, g: torch.Tensor | None) -> None:
        if g is None or g.numel() == 0:
            return
        key = (site, index)
        current = self.open.pop(key, None)
        if current is not None and current[0] != sample:
            self.acc.add_gradient(site, index, current[1])
            current = None
        g = g.detach().to(torch.float64)
        self.open[key] = (sample, g if current is None else current[1] + g)

    def flush(self) -> None:
        for (site, index), (_, g) in self.open.items():
            self.acc.add_gradient(site, index, g)
        self.open.clear()


# ----- accumulation over calibration batches --------------------------------------------------
class _Accumulator:
    """Per-layer float64 accumulators: squared gradients and squared head sums, plus block
    Grams of the activations when a PCA basis is wanted for a site, and of the gradients
    when that basis rotates the gradients afterwards (Eq. 11 as printed)."""

    def __init__(self, widths: Sequence[tuple[int, int, int]], pca: bool, ffn_block: int, device: torch.device,
                 options: GradOptions | None = None) -> None:
        """``widths``: per layer (attention mask width, v_dim, FFN mask width)."""
        self.options = options or GradOptions()
        self.pca_attention = pca
        self.pca_mlp = pca and ffn_block > 0
        self.exact = pca and self.options.gradient == "exact"
        self.sq = {"attention": [torch.zeros(a, dtype=torch.float64, device=device) for a, _, _ in widths],
                   "mlp": [torch.zeros(m, dtype=torch.float64, device=device) for _, _, m in widths]}
        self.head_sq = [torch.zeros(a // max(v, 1), dtype=torch.float64, device=device) for a, v, _ in widths]
        self.v_dims = [max(v, 1) for _, v, _ in widths]
        self.grad_blocks: dict[str, list[BlockMoments]] = {"attention": [], "mlp": []}
        self.act_blocks: dict[str, list[BlockMoments]] = {"attention": [], "mlp": []}
        self.head_to_kv: list[list[int] | None] = [None] * len(widths)
        self._bases: dict[tuple[str, int], list[torch.Tensor]] = {}
        for a, v, m in widths:
            if self.pca_attention:
                if not self.exact:
                    self.grad_blocks["attention"].append(BlockMoments(a, max(v, 1), device))
                self.act_blocks["attention"].append(BlockMoments(a, max(v, 1), device))
            if self.pca_mlp:
                if not self.exact:
                    self.grad_blocks["mlp"].append(BlockMoments(m, ffn_block, device))
                self.act_blocks["mlp"].append(BlockMoments(m, ffn_block, device))

    @classmethod
    def for_model(cls, model: PrunedForCausalLM, pca: bool, ffn_block: int, device: torch.device,
                  options: GradOptions | None = None) -> Self:
        """Sizes read from the modules (works on meta layers too: only shapes are used)."""
        widths = [(l.self_attn.num_heads * l.self_attn.v_dim, l.self_attn.v_dim, l.mlp.intermediate) for l in model.model.layers]
        return cls(widths, pca, ffn_block, device, options)

    def note_layer(self, index: int, attn: nn.Module) -> None:
        """Record the layer's head -> KV head map (read while the layer is real)."""
        self.head_to_kv[index] = [int(g) for g in attn.head_to_kv.tolist()]

    def observe(self, site: str, index: int, x: torch.Tensor) -> None:
        if self.act_blocks[site]:
            self.act_blocks[site][index].update(x)

    def add_gradients(self, site: str, grads: Sequence[torch.Tensor | None]) -> None:
        for index, g in enumerate(grads):
            self.add_gradient(site, index, g)

    def add_gradient(self, site: str, index: int, g: torch.Tensor | None) -> None:
        """One gradient sample of one site's mask (summed over the sample's passes)."""
        if g is None or g.numel() == 0:  # a layer with no heads/channels left
            return
        g = g.detach().to(torch.float64)
        self.sq[site][index] += g.pow(2)
        if site == "attention":
            self.head_sq[index] += g.reshape(-1, self.v_dims[index]).sum(1).pow(2)
        if self.grad_blocks[site]:
            self.grad_blocks[site][index].update(g[None])

    def bases(self, site: str, index: int, damping: float) -> list[torch.Tensor] | None:
        """The block PCA bases of a site (one [k, b, b] tensor per block group), or None
        when the site is not rotated; per KV group for attention with ``attention_basis="kv-group"``."""
        if not self.act_blocks[site] or not self.act_blocks[site][index].width:
            return None
        key = (site, index)
        if key not in self._bases:
            grams = self.act_blocks[site][index].matrices()
            if site == "attention" and self.options.attention_basis == "kv-group":
                if self.head_to_kv[index] is None:
                    raise RuntimeError(f"layer {index}: head_to_kv was not recorded")
                grams = [group_grams(grams[0], self.head_to_kv[index])]
            self._bases[key] = [pca_bases(a, damping) for a in grams]
        return self._bases[key]

    def scores(self, site: str, damping: float) -> list[torch.Tensor]:
        """Per layer, one score per channel (or PCA component) of the site."""
        if not self.grad_blocks[site]:
            return [s.cpu() for s in self.sq[site]]
        return [
            scores_in_bases(g, self.bases(site, i, damping)).cpu() if g.width else torch.zeros(0, dtype=torch.float64)
            for i, g in enumerate(self.grad_blocks[site])
        ]

    def head_scores(self, channels: list[torch.Tensor], num_heads: Sequence[int], damping: float) -> list[torch.Tensor]:
        """Per layer, one score per query head (``head_score``: module docstring)."""
        out = []
        for i, (c, n) in enumerate(zip(channels, num_heads)):
            if not c.numel():
                out.append(torch.zeros(n, dtype=torch.float64))
            elif self.options.head_score == "channels":
                out.append(c.reshape(n, -1).sum(1))
            elif self.grad_blocks["attention"]:  # printed Eq. 11: sum_b ((g_b Q) 1)^2 = (Q 1)^T G (Q 1)
                u = self.bases("attention", i, damping)[0].sum(2)  # [H, v]: Q 1 per head
                g = self.grad_blocks["attention"][i].matrices()[0]
                out.append(torch.einsum("hi,hij,hj->h", u, g, u).cpu())
            else:
                out.append(self.head_sq[i].cpu())
        return out

    def rotation(self, damping: float) -> Callable[[str, int], list[torch.Tensor] | None]:
        """``ChannelMasks.rotations`` for the exact gradient: each rotated site's bases."""
        return lambda site, index: self.bases(site, index, damping)


def _forward_layers(model: PrunedForCausalLM, ids: torch.Tensor) -> None:
    """The decoder layers on ``ids`` (no loss): for the activation statistics."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    freqs = inner.rotary_freqs(position_ids(ids.shape[1], ids.device))
    for layer in inner.layers:
        hidden = layer(hidden, freqs, None, None)


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
    options: GradOptions | None = None,
) -> ChannelImportance:
    """Back-propagate the LM loss of every calibration batch to the channel masks and
    turn the gradients into scores (see the module docstring for the formulas)."""
    start = time.perf_counter()
    options = options or GradOptions()
    group = options.grad_group
    losses: list[float] = []
    tokens = 0
    device = next(model.parameters()).device
    acc = _Accumulator.for_model(model, pca, int(ffn_block), device, options)
    for index, layer in enumerate(model.model.layers):
        acc.note_layer(index, layer.self_attn)
    if acc.exact:  # the bases first: a forward-only pass over the calibration data
        with torch.no_grad(), ChannelMasks(model, acc.observe) as observer:
            observer.observing = True
            for ids in batches():
                _forward_layers(model, ids)
    rotations = acc.rotation(damping) if acc.exact else None
    sums = _SampleSums(acc)
    with frozen_weights(model), ChannelMasks(model, rotations=rotations) as masks, torch.enable_grad():
        masks.observe = None if acc.exact else acc.observe
        params = masks.all()
        for step, (ids, sample) in enumerate(gradient_samples(batches(), group)):
            masks.observing = True
            loss = causal_lm_loss(model, ids, use_checkpoint, loss_chunk)
            masks.observing = False
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite calibration loss in batch {step}: {loss.item()}")
            grads = torch.autograd.grad(sample_loss(loss, ids, group), params, allow_unused=True)
            if group:
                for site, part in (("attention", grads[: len(masks.attention)]), ("mlp", grads[len(masks.attention) :])):
                    for index, g in enumerate(part):
                        sums.add(site, index, sample, g)
            else:
                acc.add_gradients("attention", grads[: len(masks.attention)])
                acc.add_gradients("mlp", grads[len(masks.attention) :])
            losses.append(float(loss.detach()))
            tokens += ids.shape[0] * max(ids.shape[1] - 1, 0)
            if progress is not None:
                progress("mask gradients", step + 1)
    sums.flush()
    return _importance(acc, model, damping, losses, tokens, start, pca, ffn_block)


def _importance(
    acc: _Accumulator, model: PrunedForCausalLM, damping: float, losses: list[float], tokens: int, start: float,
    pca: bool, ffn_block: int,
) -> ChannelImportance:
    channels = acc.scores("attention", damping)
    mlp = acc.scores("mlp", damping)
    heads = acc.head_scores(channels, [layer.self_attn.num_heads for layer in model.model.layers], damping)
    opts = acc.options
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
        "grad_group": opts.grad_group or "batch",
        "head_score": opts.head_score,
    }
    if pca:
        meta.update(gradient=opts.gradient, attention_basis=opts.attention_basis)
    return ChannelImportance(attention=heads, mlp=mlp, meta=meta, attention_channels=channels)


def streamed_mask_importance(
    run: RunContext,
    *,
    pca: bool,
    ffn_block: int = 128,
    damping: float = 0.01,
    loss_chunk: int = 512,
    progress: Callable[[str, int], Any] | None = None,
    options: GradOptions | None = None,
) -> ChannelImportance:
    """``mask_importance`` with one decoder layer in memory at a time (``run.residency``).

    Layer-major instead of batch-major: every batch goes forward through layer 0, then
    layer 1, ... (each layer's inputs are kept), the loss of each batch gives the gradient
    at the last layer's output, and the layers are walked backwards, each recomputing its
    forward for every batch and passing the input gradient down. Batch b's loss depends
    on layer l's masks only through batch b's activations, so every per-batch mask
    gradient is the same as in the whole-model pass (up to float summation order), and
    the squares are summed per batch as there. Memory: all layers' inputs,
    layers x N x L x hidden in the compute dtype, plus one layer's weights. With
    ``grad_group``, a "batch" here is one backward pass of ``gradient_samples``; with the
    exact rotated gradient, each layer first runs forward over its inputs for its bases.
    """
    start = time.perf_counter()
    options = options or GradOptions()
    group = options.grad_group
    model, residency = run.model, run.residency
    device = model.lm_head.weight.device
    passes = list(gradient_samples(run.batches(), group))
    batches = [ids for ids, _ in passes]
    n_layers = len(model.model.layers)
    acc = _Accumulator.for_model(model, pca, int(ffn_block), device, options)
    sums = _SampleSums(acc)
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
            grads.append(torch.autograd.grad(sample_loss(loss, ids, group), h)[0])
            losses.append(float(loss.detach()))
    for done, index in enumerate(reversed(range(n_layers))):
        with residency.use(model, index) as layer, frozen_weights(layer):
            acc.note_layer(index, layer.self_attn)
            xs = residency.unstash(inputs[index])
            if acc.exact:  # this layer's bases first, from its inputs
                with torch.no_grad(), ChannelMasks(model, acc.observe, layers=[index]) as observer:
                    observer.observing = True
                    for x in xs:
                        layer(x, freqs, None, None)
            rotations = acc.rotation(damping) if acc.exact else None
            with ChannelMasks(model, None if acc.exact else acc.observe, layers=[index], rotations=rotations) as masks, \
                    torch.enable_grad():
                wanted_masks = [masks.attention[0], masks.mlp[0]]
                for b, x in enumerate(xs):
                    x = x.detach().requires_grad_(index > 0)
                    masks.observing = True
                    out = layer(x, freqs, None, None)
                    masks.observing = False
                    got = torch.autograd.grad(out, wanted_masks + ([x] if index > 0 else []), grad_outputs=grads[b],
                                              allow_unused=True)
                    if group:
                        sums.add("attention", index, passes[b][1], got[0])
                        sums.add("mlp", index, passes[b][1], got[1])
                    else:
                        acc.add_gradient("attention", index, got[0])
                        acc.add_gradient("mlp", index, got[1])
                    if index > 0:
                        grads[b] = got[2]
            sums.flush()
            del xs
        inputs[index] = None
        if progress is not None:
            progress("mask gradients (layers)", done + 1)
    tokens = sum(ids.shape[0] * max(ids.shape[1] - 1, 0) for ids in batches)
    imp = _importance(acc, model, damping, losses, tokens, start, pca, ffn_block)
    imp.meta["streamed"] = True
    return imp


# ----- caching (harness.component_cache) -------------------------------------------------------
def cache_key(run: RunContext, component: str, params: dict[str, Any]) -> str | None:
    """The cache key of this run's scores (None when caching is off): every parameter that
    changes them, with the neutral values of newer options left out, so entries computed
    before those options existed stay valid."""
    result_params = dict(params)
    if "grad_group" in result_params:
        result_params["grad_group"] = group_size(result_params["grad_group"])  # "batch" and 0 are one entry
    for k, neutral in NEUTRAL_PARAMS.items():
        if k in result_params and result_params[k] == neutral:
            del result_params[k]
    return run_cache_key(run, CACHE_KIND, CACHE_VERSION, component, result_params, ignore=MEMORY_ONLY_PARAMS)


def _to_cache(imp: ChannelImportance) -> dict[str, Any]:
    return {"attention": imp.attention, "mlp": imp.mlp, "attention_channels": imp.attention_channels, "meta": imp.meta}


def _from_cache(obj: dict[str, Any]) -> ChannelImportance:
    return ChannelImportance(
        attention=list(obj["attention"]), mlp=list(obj["mlp"]), meta=dict(obj["meta"]),
        attention_channels=list(obj["attention_channels"]),
    )


def cached_importance(run: RunContext, component: str, params: dict[str, Any], pca: bool) -> ChannelImportance:
    """Scores from the cache when present, else computed (and stored)."""
    options = GradOptions.from_params(params, component)

    def compute() -> ChannelImportance:
        if run.residency.offloaded:
            return streamed_mask_importance(
                run, pca=pca, ffn_block=int(params.get("ffn_block", 0)), damping=float(params.get("damping", 0.01)),
                loss_chunk=int(params["loss_chunk"]), progress=run.progress, options=options,
            )
        return mask_importance(
            run.model, run.batches, pca=pca, ffn_block=int(params.get("ffn_block", 0)),
            damping=float(params.get("damping", 0.01)), use_checkpoint=bool(params["checkpoint"]),
            loss_chunk=int(params["loss_chunk"]), progress=run.progress, options=options,
        )

    imp, status = cached(CACHE_KIND, cache_key(run, component, params), compute, _to_cache, _from_cache)
    imp.meta["cache"] = status
    return imp


# ----- the components ----------------------------------------------------------------------------
class MaskGrad(Component):
    """Fisher importance of o_proj/down_proj input channels: sum over batches of the squared LM-loss mask gradient."""

    kind, name = "importance", "mask-grad"
    streams_layers = True
    defaults: ClassVar[dict[str, Any]] = {
        "checkpoint": True,
        "loss_chunk": 512,
        "grad_group": 0,  # sequences per gradient sample: 0 / "batch" = one batch (project), 8 = the reference
        "head_score": "channels",  # "channels" (sum of channel scores, project) or "summed" (reference)
    }

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> Importance:
        return cached_importance(run, self.name, params, pca=False)


class MaskGradPCA(Component):
    """Mask gradients rotated into block-diagonal PCA bases of the activations before squaring (IntraSlice Eq. 11)."""

    kind, name = "importance", "mask-grad-pca"
    streams_layers = True
    defaults: ClassVar[dict[str, Any]] = {
        "ffn_block": 128,
        "damping": 0.01,
        "checkpoint": True,
        "loss_chunk": 512,
        "grad_group": 0,  # as mask-grad's
        "head_score": "channels",  # as mask-grad's ("summed" sums the rotated components with "printed")
        "gradient": "printed",  # "printed" (Eq. 11 as printed, the reference) or "exact" (mask after the rotation)
        "attention_basis": "head",  # a head's own PCA basis ("head", reference) or its KV group's ("kv-group")
    }

    @hookimpl
    def score_importance(self, run: RunContext, params: dict[str, Any]) -> Importance:
        return cached_importance(run, self.name, params, pca=True)


@hookimpl
def prunebench_components() -> list[Component]:
    return [MaskGrad(), MaskGradPCA()]
