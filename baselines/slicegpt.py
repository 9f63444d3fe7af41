"""SliceGPT (Ashkboos et al., ICLR 2024) as one model-level ``transform`` component.

What it computes (faithful to microsoft/TransformerCompression's ``rotate_and_slice``):

1. Norm fusion. lm_head is untied from the embeddings, every RMSNorm scale is folded
   into the linears that read the norm (q/k/v, gate/up, lm_head) and the norms become
   weightless. An RMSNorm without a scale commutes with any orthogonal rotation of the
   residual stream, which is what makes step 2 exact at slicing 0. Unlike the reference we
   do NOT subtract the embedding row mean: that is only invariant for LayerNorm models
   and changes an RMSNorm model's logits (docs/METHODS.md); fused logits are tested.
2. Rotate and slice, layer by layer. With H = sum_tokens x^T x of a residual-stream
   signal (uncentred, float64, damped by 0.01 * mean(diag H)), Q = eigenvectors of H in
   descending order and Q' = Q[:, :d'], for layer l with input basis Q_in (the previous
   layer's output basis; the embeddings' PCA for layer 0):

       q/k/v  <- W Q_in'               attn_shortcut: x -> x (Q_in'^T Q_mid')
       o_proj <- Q_mid'^T W (and bias) gate/up <- W Q_mid'
       down   <- Q_out'^T W (and bias) mlp_shortcut:  x -> x (Q_mid'^T Q_out')

   where Q_mid is the PCA of the residual stream at the MLP input and Q_out the PCA of
   the layer output, both measured on the signals of the *already sliced* model. The
   embeddings become E Q_0' and lm_head W Q_last' (the reference's ``do_slice_head``).

How the signals are propagated: for a sliced layer whose inputs are x' (width d') the
attention sees norm(x') through W Q_in'; because Q_in' has orthonormal columns and the
norm divides by the *original* width (``PrunedConfig.norm_dim``), that equals the fused
dense layer applied to the reconstruction x' Q_in'^T. So the signals the reference
obtains by running a half-sliced layer are computed here by running the fused dense
layer's attention and MLP on reconstructions (``_attention_residual``,
``_mlp_residual``): the same numbers, with no half-sliced module shapes. The next layer's
inputs are ``out @ Q_out'``, i.e. exactly what the sliced layer outputs.

The residual width changes for the whole model, so the transform builds a new
``PrunedForCausalLM`` (hidden_size = d', norm_dim = d, weightless norms, untied head,
shortcut matrices in every layer) and assigns it to ``run.model``.

Sparsity: the harness compares methods at *parameter* sparsity of the decoder layers,
and the shortcut matrices (2 d'^2 per layer) count. d' is the multiple of ``multiple``
whose decoder parameter count is nearest the target (ties: the wider one). Because of
the shortcuts, a slicing fraction s removes less than s of the parameters (SmolLM2-135M:
slicing 14% removes ~0%, slicing 29% removes ~20%); every target in [0, 1) is reachable
within the width granularity, but small targets cost a lot of width for nothing. The
``slicing`` parameter gives SliceGPT's own fraction instead (d' = floor((1 - s) d),
rounded down to ``multiple``, as the reference does); its parameter sparsity may then be
negative, which the summary reports. Embeddings and lm_head are outside the decoder
sparsity; the extra lm_head of an untied model is reported in the summary.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from prunebench.harness.components import Component
from prunebench.harness.context import RunContext, embed, position_ids
from prunebench.harness.contracts import ComponentRef, Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.hookspecs import hookimpl
from prunebench.harness.params import decoder_params
from prunebench.harness.pruned_model import (
    PrunedConfig,
    PrunedDecoderLayer,
    PrunedForCausalLM,
    PrunedRMSNorm,
)
from prunebench.harness.stats import compute_dtype, damped, eigh_descending


# ----- norm fusion --------------------------------------------------------------------
def _check_dense(model: PrunedForCausalLM) -> None:
    """SliceGPT rotates plain linears of a model that has not been sliced yet."""
    for i, layer in enumerate(model.model.layers):
        linears = [getattr(layer.self_attn, f"{n}_proj") for n in "qkvo"]
        linears += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any(type(m) is not nn.Linear for m in linears) or layer.mlp.branch is not None:
            raise UsageError(f"slicegpt needs dense projections; layer {i} has factor pairs or a branch")
        if layer.attn_shortcut is not None or layer.mlp_shortcut is not None:
            raise UsageError(f"slicegpt expects an unsliced model; layer {i} already has shortcut matrices")
    if model.config.norm_dim != model.config.hidden_size:
        raise UsageError("slicegpt expects an unsliced model (norm_dim differs from hidden_size)")


def untie_lm_head(model: PrunedForCausalLM) -> bool:
    """Give lm_head its own weight (it is rotated differently from the embeddings).

    Returns True when the head was tied. The extra V x d parameters are not decoder
    parameters, so they do not enter the sparsity (docs/ARCHITECTURE.md, "The pruned model": tied embeddings).
    """
    tied = model.lm_head.weight is model.model.embed_tokens.weight or bool(model.config.tie_word_embeddings)
    if tied:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    """W <- W diag(scale): the norm's scale moves into the linear that reads it."""
    w = linear.weight
    linear.weight.copy_((w.to(torch.float64) * scale.to(device=w.device, dtype=torch.float64)).to(w.dtype))


def _fold(norm: PrunedRMSNorm, readers: list[nn.Linear]) -> None:
    if norm.weight is None:
        return
    scale = norm.weight.detach()
    for linear in readers:
        _scale_columns(linear, scale)
    norm.weight = None


@torch.no_grad()
def fuse_norms(model: PrunedForCausalLM) -> dict[str, Any]:
    """Untie lm_head and fold every RMSNorm scale into its readers, in place.

    The model computes the same logits afterwards (up to rounding); its norms are
    weightless, so they commute with rotations of the residual stream.
    """
    _check_dense(model)
    tied = untie_lm_head(model)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fold(model.model.norm, [model.lm_head])
    model.config.norm_has_weight = False
    return {"untied_lm_head": tied}


# ----- PCA ----------------------------------------------------------------------------
def _chunks(x: torch.Tensor, batch_size: int) -> Iterator[slice]:
    for start in range(0, x.shape[0], batch_size):
        yield slice(start, start + batch_size)


@torch.no_grad()
def pca_basis(signal: torch.Tensor, batch_size: int, damping: float) -> torch.Tensor:
    """Eigenvectors (columns, eigenvalues descending) of the damped uncentred X^T X.

    X^T X is formed in float64 batch by batch (the reference's ``pca_calc``); calibration
    has no padding, so every token counts.
    """
    d = signal.shape[-1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=signal.device)
    for part in _chunks(signal, batch_size):
        x = signal[part].reshape(-1, d).to(torch.float64)
        gram += x.T @ x
    _, vecs = eigh_descending(damped(gram, damping))
    return vecs


# ----- widths and parameter counts ------------------------------------------------------
def _readers(layer: PrunedDecoderLayer) -> list[nn.Module]:
    """Linears whose input is the residual stream (their columns get sliced)."""
    a, m = layer.self_attn, layer.mlp
    return [a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj]


def _writers(layer: PrunedDecoderLayer) -> list[nn.Module]:
    """Linears whose output is the residual stream (their rows and biases get sliced)."""
    return [layer.self_attn.o_proj, layer.mlp.down_proj]


def sliced_decoder_params(model: PrunedForCausalLM, width: int) -> int:
    """Decoder-layer parameters of ``model`` sliced to ``width``, shortcut matrices included."""
    total = 0
    for layer in model.model.layers:
        for m in _readers(layer):
            total += m.out_features * width + (m.out_features if m.bias is not None else 0)
        for m in _writers(layer):
            total += m.in_features * width + (width if m.bias is not None else 0)
        total += 2 * width * width  # attn_shortcut and mlp_shortcut
    return total


def width_for_slicing(hidden: int, slicing: float, multiple: int) -> int:
    """SliceGPT's own rule: floor((1 - s) * d), rounded down to a multiple."""
    if not 0.0 <= float(slicing) < 1.0:
        raise UsageError(f"slicegpt slicing must be in [0, 1), got {slicing!r}")
    width = int((1.0 - float(slicing)) * hidden)
    width -= width % multiple if multiple > 1 and width != hidden else 0
    if width <= 0:
        raise UsageError(f"slicing {slicing} leaves no residual width (hidden {hidden}, multiple {multiple})")
    return width


def width_for_sparsity(model: PrunedForCausalLM, target: float, multiple: int) -> int:
    """The width (a multiple of ``multiple``, or the full width) whose decoder parameter
    sparsity, shortcut matrices included, is nearest ``target``; ties go to the wider.

    Always feasible: the full width has negative sparsity (the shortcuts add 2 d^2 per
    layer) and the narrowest keeps almost nothing, so the nearest width is returned and
    the summary records how far it lands from the target."""
    hidden, dense = model.config.hidden_size, decoder_params(model)
    candidates = sorted(set(range(multiple, hidden + 1, max(multiple, 1))) | {hidden}, reverse=True)
    return min(candidates, key=lambda w: abs(1.0 - sliced_decoder_params(model, w) / dense - target))


# ----- the sliced model -----------------------------------------------------------------
def sliced_config(config: PrunedConfig, width: int) -> PrunedConfig:
    """The config of the sliced model: narrower residual, original norm divisor,
    weightless norms, untied head, shortcut matrices in every layer."""
    layers = copy.deepcopy(config.layers)
    for spec in layers:
        spec["attn"]["shortcut"] = True
        spec["mlp"]["shortcut"] = True
    values = config.to_dict()
    values.update(
        hidden_size=width, norm_dim=config.norm_dim, norm_has_weight=False,
        tie_word_embeddings=False, layers=layers,
    )
    return PrunedConfig.from_dict(values)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _copy_readers(src: list[nn.Linear], dst: list[nn.Linear], basis: torch.Tensor) -> None:
    """Inputs rotated and sliced: W <- W Q'; output biases unchanged."""
    for s, t in zip(src, dst):
        _set(t.weight, _f64(s.weight) @ basis)
        if s.bias is not None:
            _set(t.bias, s.bias.detach())


def _copy_writer(src: nn.Linear, dst: nn.Linear, basis: torch.Tensor) -> None:
    """Outputs rotated and sliced: W <- Q'^T W, b <- Q'^T b."""
    _set(dst.weight, basis.T @ _f64(src.weight))
    if src.bias is not None:
        _set(dst.bias, basis.T @ _f64(src.bias))


def _shortcut(dst: nn.Linear, basis_in: torch.Tensor, basis_out: torch.Tensor) -> None:
    """Residual map x -> x (Q_in'^T Q_out'): an nn.Linear holds its transpose."""
    _set(dst.weight, basis_out.T @ basis_in)


# ----- signals ----------------------------------------------------------------------------
def _map_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int, width: int) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], width)
    for part in _chunks(x, batch_size):
        out[part] = fn(x[part])
    return out


def _attention_residual(layer: PrunedDecoderLayer, freqs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x + attention(norm(x)) of a fused dense layer (the MLP-input residual)."""
    return lambda x: x + layer.self_attn(layer.input_layernorm(x), freqs, None, None)


def _mlp_residual(layer: PrunedDecoderLayer) -> Callable[[torch.Tensor], torch.Tensor]:
    """h -> h + mlp(norm(h)) of a fused dense layer (the layer output)."""
    return lambda h: h + layer.mlp(layer.post_attention_layernorm(h))


def _reconstruct(basis: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """x' (width d') -> x' Q'^T (width d): the sliced signal in the original basis."""
    back = basis.T.to(torch.promote_types(dtype, torch.float32))
    return lambda x: (x.to(back.dtype) @ back).to(dtype)


def _compose(first: Callable[[torch.Tensor], torch.Tensor], then: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: then(first(x))


def _project(signal: torch.Tensor, basis: torch.Tensor, batch_size: int) -> torch.Tensor:
    q = basis.to(compute_dtype(signal))
    return _map_batches(lambda x: (x.to(q.dtype) @ q).to(signal.dtype), signal, batch_size, basis.shape[1])


@torch.no_grad()
def rotate_and_slice(
    model: PrunedForCausalLM, calibration: torch.Tensor, batch_size: int, device: torch.device,
    width: int, damping: float,
) -> PrunedForCausalLM:
    """A new model of residual width ``width`` built from the fused ``model``."""
    param = model.model.embed_tokens.weight
    dtype, hidden = param.dtype, model.config.hidden_size
    new = PrunedForCausalLM(sliced_config(model.config, width)).to(device=param.device, dtype=dtype).eval()
    _set(new.model.inv_freq, model.model.inv_freq)

    x = embed(model, calibration, batch_size, device)  # [N, L, d]
    basis = pca_basis(x, batch_size, damping)[:, :width]
    _set(new.model.embed_tokens.weight, _f64(param) @ basis.to(param.device))
    x = _project(x, basis, batch_size)
    freqs = model.model.rotary_freqs(position_ids(x.shape[1], x.device))
    for old, fresh in zip(model.model.layers, new.model.layers):
        attention = _compose(_reconstruct(basis, dtype), _attention_residual(old, freqs))
        mid = _map_batches(attention, x, batch_size, hidden)
        mid_basis = pca_basis(mid, batch_size, damping)[:, :width]
        mid = _project(mid, mid_basis, batch_size)
        mlp = _compose(_reconstruct(mid_basis, dtype), _mlp_residual(old))
        out = _map_batches(mlp, mid, batch_size, hidden)
        del mid
        out_basis = pca_basis(out, batch_size, damping)[:, :width]
        x = _project(out, out_basis, batch_size)
        del out
        _fill_layer(old, fresh, basis, mid_basis, out_basis)
        basis = out_basis
    _set(new.lm_head.weight, _f64(model.lm_head.weight) @ basis.to(model.lm_head.weight.device))
    return new


def _fill_layer(old: PrunedDecoderLayer, fresh: PrunedDecoderLayer, q_in: torch.Tensor, q_mid: torch.Tensor, q_out: torch.Tensor) -> None:
    """Rotated and sliced tensors of one layer, and its two shortcut matrices."""
    dev = old.self_attn.q_proj.weight.device
    q_in, q_mid, q_out = q_in.to(dev), q_mid.to(dev), q_out.to(dev)
    oa, fa = old.self_attn, fresh.self_attn
    _copy_readers([oa.q_proj, oa.k_proj, oa.v_proj], [fa.q_proj, fa.k_proj, fa.v_proj], q_in)
    _copy_writer(oa.o_proj, fa.o_proj, q_mid)
    _set(fa.rope_index, oa.rope_index)
    _set(fa.head_to_kv, oa.head_to_kv)
    _shortcut(fresh.attn_shortcut, q_in, q_mid)
    om, fm = old.mlp, fresh.mlp
    _copy_readers([om.gate_proj, om.up_proj], [fm.gate_proj, fm.up_proj], q_mid)
    _copy_writer(om.down_proj, fm.down_proj, q_out)
    _shortcut(fresh.mlp_shortcut, q_mid, q_out)


# ----- the component ----------------------------------------------------------------------
class SliceGPTTransform(Component):
    """SliceGPT: fuse norms, rotate the residual stream by per-layer PCA, slice it to d'."""

    kind, name = "transform", "slicegpt"
    defaults: ClassVar[dict[str, Any]] = {"slicing": None, "multiple": 8, "damping": 0.01}
    budget_params = ("slicing",)

    @hookimpl
    def transform_model(self, run: RunContext, params: dict[str, Any]) -> dict[str, Any]:
        model = run.model
        _check_dense(model)
        multiple = int(params["multiple"])
        if multiple < 1:
            raise UsageError(f"slicegpt multiple must be >= 1, got {multiple}")
        hidden, dense = model.config.hidden_size, decoder_params(model)
        if params["slicing"] is None:
            width = width_for_sparsity(model, float(run.target), multiple)
        else:
            width = width_for_slicing(hidden, float(params["slicing"]), multiple)
        predicted = sliced_decoder_params(model, width)
        fusion = fuse_norms(model)
        run.model = rotate_and_slice(model, run.calibration, run.batch_size, run.device, width, float(params["damping"]))
        achieved = 1.0 - predicted / dense
        summary = {
            **fusion,
            "hidden": hidden,
            "width": width,
            "slicing": 1.0 - width / hidden,
            "slicing_requested": params["slicing"],
            "target_sparsity": float(run.target),
            "parameter_sparsity": achieved,
            "shortcut_params": 2 * width * width * len(model.model.layers),
            "lm_head_params": int(run.model.lm_head.weight.numel()),
        }
        if achieved < 0:
            summary["note"] = (
                f"slicing {summary['slicing']:.3f} adds parameters: the shortcut matrices cost more than the "
                "slicing removes"
            )
        return summary


@hookimpl
def prunebench_components() -> list[Component]:
    return [SliceGPTTransform()]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return [
        Recipe(
            "slicegpt",
            {
                "transform": ComponentRef("slicegpt"),
                "allocation": ComponentRef("uniform"),
                "attention": ComponentRef("keep"),
                "ffn": ComponentRef("keep"),
            },
            "SliceGPT (Ashkboos et al. 2024): norm fusion, per-layer PCA rotation, residual width sliced.",
        )
    ]
