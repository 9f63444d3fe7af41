"""Tests of the mask-gradient importance components (`mask-grad`, `mask-grad-pca`)."""

from __future__ import annotations

import pytest
import torch

from prunebench.harness import pruned_model
from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import RunContext
from prunebench.harness.surgery import (
    apply_attention_plan,
    apply_mlp_plan,
    attention_plan_of,
    keep_channels,
    keep_heads,
    mlp_plan_of,
)
from prunebench.harness.testing import tiny_model
from prunebench.plugins import mask_grad
from prunebench.plugins.mask_grad import (
    ChannelMasks,
    GradOptions,
    MaskGrad,
    MaskGradPCA,
    causal_lm_loss,
    frozen_weights,
    gradient_samples,
    mask_importance,
    streamed_mask_importance,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core box OpenMP's
    spin-waiting makes every small op slow (seconds instead of milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def float64_norm(monkeypatch):
    """RMSNorm in the input's precision: the stock norm rounds through float32, which
    would swamp a float64 finite difference with float32 noise."""

    def forward(self, x):
        h = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.norm_dim + self.eps)
        return h if self.weight is None else self.weight * h

    monkeypatch.setattr(pruned_model.PrunedRMSNorm, "forward", forward)


def _batch_gradients(model, ids):
    """Per-site mask gradients of one batch, straight from autograd (no accumulation code)."""
    with frozen_weights(model), ChannelMasks(model) as masks, torch.enable_grad():
        loss = causal_lm_loss(model, ids, use_checkpoint=False, loss_chunk=0)
        grads = torch.autograd.grad(loss, masks.all())
    n = len(masks.attention)
    return [g.double() for g in grads[:n]], [g.double() for g in grads[n:]]


@pytest.mark.parametrize("kind", ["llama-gqa", "phi3"])
def test_mask_gradients_match_finite_differences(kind: str, float64_norm) -> None:
    """The mask gradient of input channel c equals dL/dm for W[:, c] -> m * W[:, c],
    estimated by central differences on the weights alone (no hooks involved)."""
    model = to_pruned(tiny_model(kind)).double()
    ids = _ids()
    eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    with frozen_weights(model), ChannelMasks(model) as masks, torch.enable_grad():
        # checkpointed layers and a chunked loss: the configuration the component runs in
        loss = causal_lm_loss(model, ids, use_checkpoint=True, loss_chunk=7)
        grads = torch.autograd.grad(loss, masks.all())
    layers = model.model.layers
    projections = [l.self_attn.o_proj for l in layers] + [l.mlp.down_proj for l in layers]

    def loss_with_column_scaled(weight: torch.Tensor, c: int, factor: float) -> float:
        with torch.no_grad():
            saved = weight[:, c].clone()
            weight[:, c] *= factor
            value = float(model(ids, labels=None).logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().neg())
            weight[:, c] = saved
        return value

    for proj, grad in zip(projections, grads):
        assert grad.numel() == proj.in_features
        for c in torch.randperm(proj.in_features, generator=gen)[:6].tolist():
            fd = (loss_with_column_scaled(proj.weight, c, 1 + eps) - loss_with_column_scaled(proj.weight, c, 1 - eps)) / (2 * eps)
            assert float(grad[c]) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_loss_is_the_models_next_token_cross_entropy() -> None:
    model = to_pruned(tiny_model("llama-bias"))
    ids = _ids(3, 20)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss
    with torch.enable_grad():
        mine = causal_lm_loss(model, ids, use_checkpoint=True, loss_chunk=13)
    assert float(mine.detach()) == pytest.approx(float(ref), rel=1e-5)


def test_importance_is_the_sum_of_squared_batch_gradients() -> None:
    model = to_pruned(tiny_model("llama-gqa")).double()
    batches = [_ids(2, 16, 0), _ids(2, 16, 1)]
    imp = mask_importance(model, lambda: iter(batches), pca=False)
    per_batch = [_batch_gradients(model, ids) for ids in batches]
    for layer in range(2):
        attn = sum(g[0][layer].pow(2) for g in per_batch)
        mlp = sum(g[1][layer].pow(2) for g in per_batch)
        torch.testing.assert_close(imp.attention_channels[layer], attn, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(imp.mlp[layer], mlp, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(imp.attention[layer], attn.reshape(4, 16).sum(1), rtol=1e-9, atol=1e-15)
    assert imp.meta["basis"] == "channel" and imp.meta["batches"] == 2


def _block_bases(gram: torch.Tensor, sizes: list[int], damping: float) -> torch.Tensor:
    """The block-diagonal PCA basis, built densely one block at a time (reference code)."""
    q = torch.zeros_like(gram)
    start = 0
    for size in sizes:
        block = gram[start : start + size, start : start + size]
        block = block + damping * block.diagonal().mean() * torch.eye(size, dtype=gram.dtype)
        vals, vecs = torch.linalg.eigh(block)
        q[start : start + size, start : start + size] = vecs[:, vals.argsort(descending=True)]
        start += size
    return q


def test_pca_scores_are_rotated_squared_gradients() -> None:
    """Eq. 11 computed the slow way: capture activations, build Q_s densely, rotate every
    batch's gradient, square, sum; an FFN block size that leaves a remainder block."""
    model = to_pruned(tiny_model("llama-gqa")).double()
    batches = [_ids(2, 16, 0), _ids(2, 16, 1), _ids(2, 16, 2)]
    imp = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=40, damping=0.01)
    plain = mask_importance(model, lambda: iter(batches), pca=False)
    grams = {}

    def capture(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(capture(("attention", i))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(capture(("mlp", i))))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    per_batch = [_batch_gradients(model, ids) for ids in batches]
    for layer in range(2):
        q_attn = _block_bases(grams[("attention", layer)], [16] * 4, 0.01)
        q_mlp = _block_bases(grams[("mlp", layer)], [40, 40, 16], 0.01)
        attn = sum((g[0][layer] @ q_attn).pow(2) for g in per_batch)
        mlp = sum((g[1][layer] @ q_mlp).pow(2) for g in per_batch)
        torch.testing.assert_close(imp.attention_channels[layer], attn, rtol=1e-7, atol=1e-14)
        torch.testing.assert_close(imp.mlp[layer], mlp, rtol=1e-7, atol=1e-14)
        # a head's (block's) total is rotation invariant: the same as without PCA
        torch.testing.assert_close(imp.attention[layer], plain.attention[layer], rtol=1e-9, atol=1e-15)
        assert not torch.allclose(imp.mlp[layer], plain.mlp[layer])
    assert imp.meta["basis"] == "pca" and imp.meta["ffn_block"] == 40


# ----- gradient samples (grad_group) and head scores (head_score) ------------------------------
def _sequence_gradients(model, ids):
    """Per-sequence mask gradients (each sequence its own mean loss), as the reference takes them."""
    return [_batch_gradients(model, ids[i : i + 1]) for i in range(ids.shape[0])]


def _grouped(per_seq, group: int, site: int, layer: int) -> list[torch.Tensor]:
    """The summed gradient of every run of ``group`` consecutive sequences (last run shorter)."""
    return [sum(g[site][layer] for g in per_seq[s : s + group]) for s in range(0, len(per_seq), group)]


def test_gradient_samples_cut_batches_at_sample_boundaries() -> None:
    batches = [_ids(4, 8, s) for s in range(3)]  # 12 sequences
    cuts = [(ids.shape[0], sample) for ids, sample in gradient_samples(iter(batches), 3)]
    assert cuts == [(3, 0), (1, 1), (2, 1), (2, 2), (1, 2), (3, 3)]
    assert [s for _, s in gradient_samples(iter(batches), 0)] == [0, 1, 2]
    assert [(ids.shape[0], s) for ids, s in gradient_samples(iter(batches), 8)] == [(4, 0), (4, 0), (4, 1)]
    joined = torch.cat([ids for ids, _ in gradient_samples(iter(batches), 3)])
    assert torch.equal(joined, torch.cat(batches))


@pytest.mark.parametrize("group", [3, 8])
def test_grad_group_sums_sequence_gradients_before_squaring(group: int) -> None:
    """grad_group=n: sum_samples (sum of n sequences' gradients)^2; 3 cuts every batch of 4."""
    model = to_pruned(tiny_model("llama-gqa")).double()
    ids = _ids(12, 16, 5)
    batches = [ids[0:4], ids[4:8], ids[8:12]]
    per_seq = _sequence_gradients(model, ids)
    for head_score in ("channels", "summed"):
        imp = mask_importance(model, lambda: iter(batches), pca=False, options=GradOptions(group, head_score))
        for layer in range(2):
            attn = _grouped(per_seq, group, 0, layer)
            mlp = _grouped(per_seq, group, 1, layer)
            torch.testing.assert_close(imp.attention_channels[layer], sum(g.pow(2) for g in attn), rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(imp.mlp[layer], sum(g.pow(2) for g in mlp), rtol=1e-9, atol=1e-15)
            if head_score == "summed":  # the square of each head's summed gradient
                heads = sum(g.reshape(4, 16).sum(1).pow(2) for g in attn)
            else:
                heads = sum(g.pow(2) for g in attn).reshape(4, 16).sum(1)
            torch.testing.assert_close(imp.attention[layer], heads, rtol=1e-9, atol=1e-15)
        assert imp.meta["grad_group"] == group and imp.meta["head_score"] == head_score
    # the two head scores really differ, and so do grouped and per-batch samples
    summed = mask_importance(model, lambda: iter(batches), pca=False, options=GradOptions(group, "summed"))
    channels = mask_importance(model, lambda: iter(batches), pca=False, options=GradOptions(group, "channels"))
    per_batch = mask_importance(model, lambda: iter(batches), pca=False)
    assert not torch.allclose(summed.attention[0], channels.attention[0])
    assert not torch.allclose(channels.mlp[0], per_batch.mlp[0])


def test_grad_group_zero_and_batch_are_the_current_scores() -> None:
    model = to_pruned(tiny_model("llama-gqa"))
    batches = [_ids(4, 16, 0), _ids(4, 16, 1)]
    plain = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=32)
    for value in (0, "batch"):
        opts = GradOptions.from_params({**MaskGradPCA.defaults, "grad_group": value})
        again = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=32, options=opts)
        for a, b in zip(plain.attention + plain.mlp + plain.attention_channels, again.attention + again.mlp + again.attention_channels):
            assert torch.equal(a, b)
    for bad in ({"grad_group": -1}, {"grad_group": 2.5}, {"head_score": "max"}, {"gradient": "paper"},
                {"attention_basis": "layer"}):
        with pytest.raises(Exception, match="grad_group|head_score|gradient|attention_basis"):
            GradOptions.from_params({**MaskGradPCA.defaults, **bad})


def test_summed_head_score_of_printed_pca_sums_rotated_components() -> None:
    """Reference global_pca: a head's score is sum_b ((g_b Q) 1)^2 (rotated components summed)."""
    model = to_pruned(tiny_model("llama-gqa")).double()
    batches = [_ids(2, 16, 0), _ids(2, 16, 1), _ids(2, 16, 2)]
    imp = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=0, options=GradOptions(head_score="summed"))
    grams = _o_in_grams(model, batches)
    per_batch = [_batch_gradients(model, ids) for ids in batches]
    for layer in range(2):
        q = _block_bases(grams[layer], [16] * 4, 0.01)
        heads = sum((g[0][layer] @ q).reshape(4, 16).sum(1).pow(2) for g in per_batch)
        torch.testing.assert_close(imp.attention[layer], heads, rtol=1e-7, atol=1e-14)
        plain = sum(g[0][layer].reshape(4, 16).sum(1).pow(2) for g in per_batch)
        assert not torch.allclose(imp.attention[layer], plain)


def _o_in_grams(model, batches, site: str = "attention") -> dict[int, torch.Tensor]:
    """X^T X of every layer's o_proj (or down_proj) input over ``batches``, float64."""
    grams: dict[int, torch.Tensor] = {}

    def capture(i):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[i] = grams.get(i, 0) + x.T @ x

        return hook

    handles = [(l.self_attn.o_proj if site == "attention" else l.mlp.down_proj).register_forward_pre_hook(capture(i))
               for i, l in enumerate(model.model.layers)]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in handles:
        h.remove()
    return grams


# ----- the exact rotated gradient (gradient="exact") --------------------------------------------
def _rotated_mask_gradients(model, ids, q_attn: dict, q_mlp: dict):
    """Autograd's gradient of explicit masks after the rotation, x -> x Q diag(m) Q^T at m = 1."""
    masks, handles = [], []

    def install(module, q):
        m = torch.ones(q.shape[0], dtype=q.dtype, requires_grad=True)
        masks.append(m)
        handles.append(module.register_forward_pre_hook(lambda mod, args: ((args[0] @ q) * m @ q.T,)))

    with frozen_weights(model), torch.enable_grad():
        for i, layer in enumerate(model.model.layers):
            install(layer.self_attn.o_proj, q_attn[i])
        for i, layer in enumerate(model.model.layers):
            install(layer.mlp.down_proj, q_mlp[i])
        try:
            loss = causal_lm_loss(model, ids, use_checkpoint=False, loss_chunk=0)
            grads = torch.autograd.grad(loss, masks)
        finally:
            for h in handles:
                h.remove()
    n = len(model.model.layers)
    return list(grads[:n]), list(grads[n:])


@pytest.mark.parametrize("kind", ["llama-gqa", "phi3"])
def test_exact_gradient_is_the_gradient_of_a_rotated_mask(kind: str) -> None:
    model = to_pruned(tiny_model(kind)).double()
    batches = [_ids(2, 16, 0), _ids(2, 16, 1), _ids(2, 16, 2)]
    exact = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=40, options=GradOptions(gradient="exact"))
    printed = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=40)
    attn_grams, mlp_grams = _o_in_grams(model, batches), _o_in_grams(model, batches, "mlp")
    q_attn = {i: _block_bases(g, [16] * 4, 0.01) for i, g in attn_grams.items()}
    q_mlp = {i: _block_bases(g, [40, 40, 16], 0.01) for i, g in mlp_grams.items()}
    per_batch = [_rotated_mask_gradients(model, ids, q_attn, q_mlp) for ids in batches]
    for layer in range(2):
        attn = sum(g[0][layer].pow(2) for g in per_batch)
        mlp = sum(g[1][layer].pow(2) for g in per_batch)
        torch.testing.assert_close(exact.attention_channels[layer], attn, rtol=1e-7, atol=1e-14)
        torch.testing.assert_close(exact.mlp[layer], mlp, rtol=1e-7, atol=1e-14)
        # Eq. 11 as printed rotates the channel gradient instead: a different number
        assert not torch.allclose(printed.attention_channels[layer], attn, rtol=1e-3)
        assert not torch.allclose(printed.mlp[layer], mlp, rtol=1e-3)
    assert exact.meta["gradient"] == "exact"


def test_exact_gradient_leaves_the_loss_unchanged() -> None:
    """The rotated mask is x + ((x Q) * 0) Q^T: the forward pass is the model's, bitwise."""
    model = to_pruned(tiny_model("llama-gqa"))
    batches = [_ids(4, 16, 0)]
    exact = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=32, options=GradOptions(gradient="exact"))
    plain = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=32)
    assert exact.meta["mean_loss"] == plain.meta["mean_loss"]


# ----- KV-group bases (attention_basis) -----------------------------------------------------------
@pytest.mark.parametrize("gradient", ["printed", "exact"])
def test_kv_group_basis_equals_head_basis_under_mha_only(gradient: str) -> None:
    batches = [_ids(2, 16, 0), _ids(2, 16, 1)]
    out = {}
    for kind in ("llama-mha", "llama-gqa"):
        model = to_pruned(tiny_model(kind)).double()
        for basis in ("head", "kv-group"):
            out[kind, basis] = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=32,
                                               options=GradOptions(gradient=gradient, attention_basis=basis))
    for a, b in zip(out["llama-mha", "head"].attention_channels, out["llama-mha", "kv-group"].attention_channels):
        assert torch.equal(a, b)
    assert not torch.allclose(out["llama-gqa", "head"].attention_channels[0], out["llama-gqa", "kv-group"].attention_channels[0])
    # the FFN is not affected by the attention basis
    assert torch.equal(out["llama-gqa", "head"].mlp[0], out["llama-gqa", "kv-group"].mlp[0])


def test_kv_group_basis_is_the_eigenbasis_of_the_summed_group_grams() -> None:
    model = to_pruned(tiny_model("llama-gqa")).double()  # heads 0, 1 read KV head 0; heads 2, 3 KV head 1
    batches = [_ids(2, 16, 0), _ids(2, 16, 1)]
    imp = mask_importance(model, lambda: iter(batches), pca=True, ffn_block=0, options=GradOptions(attention_basis="kv-group"))
    grams = _o_in_grams(model, batches)
    per_batch = [_batch_gradients(model, ids) for ids in batches]
    for layer in range(2):
        g = grams[layer]
        blocks = [g[h * 16 : (h + 1) * 16, h * 16 : (h + 1) * 16] for h in range(4)]
        group = [blocks[0] + blocks[1], blocks[0] + blocks[1], blocks[2] + blocks[3], blocks[2] + blocks[3]]
        q = torch.block_diag(*[_block_bases(b, [16], 0.01) for b in group])
        expected = sum((grads[0][layer] @ q).pow(2) for grads in per_batch)
        torch.testing.assert_close(imp.attention_channels[layer], expected, rtol=1e-7, atol=1e-14)


def test_streamed_options_match_whole_model(tmp_path) -> None:
    """The layer-offloaded pass gives the same scores with every option set."""
    from prunebench.harness.offload import DiskLayers

    source = tiny_model("llama-gqa", layers=3)
    directory = tmp_path / "src"
    source.save_pretrained(directory)
    ids = _ids(8, 16, 3)
    model = to_pruned(source)
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    for opts in (GradOptions(3, "summed", "exact", "kv-group"), GradOptions(8, "summed", "printed", "head")):
        expected = mask_importance(model, run.batches, pca=True, ffn_block=32, options=opts)
        store = DiskLayers(directory, tmp_path / f"out-{opts.grad_group}")
        streamed = RunContext(model=store.model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0,
                              target=0.3, residency=store)
        got = streamed_mask_importance(streamed, pca=True, ffn_block=32, options=opts)
        for a, b in zip(expected.attention + expected.attention_channels + expected.mlp,
                        got.attention + got.attention_channels + got.mlp):
            assert float((b - a).abs().max()) <= 1e-5 * float(a.abs().max())  # float32 summation order


def test_weights_stay_frozen_and_the_model_unchanged(monkeypatch) -> None:
    model = to_pruned(tiny_model("llama-gqa"))
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    real = mask_grad.causal_lm_loss

    def watching(m, *args, **kwargs):
        seen.append(any(p.requires_grad for p in m.parameters()))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(mask_grad, "causal_lm_loss", watching)
    mask_importance(model, lambda: iter([ids, ids]), pca=True, ffn_block=32)
    assert seen == [False, False], "weights must not require gradients during the backward passes"
    assert all(p.grad is None for p in model.parameters()), "no weight gradient may be allocated"
    assert [p.requires_grad for p in model.parameters()] == flags, "flags are restored"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # hooks removed, weights untouched


def test_pruned_layers_of_uneven_widths() -> None:
    """After earlier pruning (uneven GQA groups, a narrower FFN) the masks follow the real widths."""
    model = to_pruned(tiny_model("llama-gqa"))
    apply_attention_plan(model, 0, keep_heads(attention_plan_of(model.model.layers[0].self_attn), [0, 2, 3]))
    apply_mlp_plan(model, 1, keep_channels(mlp_plan_of(model.model.layers[1].mlp), torch.arange(0, 96, 2)))
    imp = mask_importance(model, lambda: iter([_ids()]), pca=True, ffn_block=32)
    assert [t.numel() for t in imp.attention] == [3, 4]
    assert [t.numel() for t in imp.attention_channels] == [48, 64]
    assert [t.numel() for t in imp.mlp] == [96, 48]
    assert all(bool(torch.isfinite(t).all()) and float(t.sum()) > 0 for t in imp.mlp + imp.attention)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path))
    calls = []
    real = mask_grad.mask_importance

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mask_grad, "mask_importance", counting)
    model = to_pruned(tiny_model("llama-gqa"))
    parts = {"model": "tiny-abc", "data": "wiki-1", "samples": 4, "seqlen": 16, "seed": 0}
    component = MaskGradPCA()
    params = dict(MaskGradPCA.defaults)

    def score(use_cache=True, params=params, **changes):
        run = RunContext(model=model, calibration=_ids(), batch_size=2, device=torch.device("cpu"), seed=0,
                         target=0.3, cache_parts={**parts, **changes}, use_cache=use_cache)
        return component.score_importance(run=run, params=params)

    first = score()
    assert len(calls) == 1 and first.meta["cache"] == "miss"
    again = score()
    assert len(calls) == 1 and again.meta["cache"] == "hit"
    for a, b in zip(first.mlp + first.attention_channels, again.mlp + again.attention_channels):
        torch.testing.assert_close(a, b)
    assert score(data="wiki-2").meta["cache"] == "miss" and len(calls) == 2
    assert score(seed=1).meta["cache"] == "miss" and len(calls) == 3
    assert score(seqlen=32).meta["cache"] == "miss" and len(calls) == 4
    assert score(params={**params, "ffn_block": 32}).meta["cache"] == "miss" and len(calls) == 5
    assert score(params={**params, "loss_chunk": 3}).meta["cache"] == "hit" and len(calls) == 5  # memory-only knob
    assert score(use_cache=False).meta["cache"] == "off" and len(calls) == 6
    # every option that changes the scores is in the key; "batch" is grad_group 0
    assert score(params={**params, "grad_group": "batch"}).meta["cache"] == "hit" and len(calls) == 6
    for i, change in enumerate(({"grad_group": 8}, {"head_score": "summed"}, {"gradient": "exact"},
                                {"attention_basis": "kv-group"}), start=7):
        assert score(params={**params, **change}).meta["cache"] == "miss" and len(calls) == i
    # mask-grad and mask-grad-pca never share an entry
    run = RunContext(model=model, calibration=_ids(), batch_size=2, device=torch.device("cpu"), seed=0, target=0.3, cache_parts=parts)
    assert MaskGrad().score_importance(run=run, params=dict(MaskGrad.defaults)).meta["cache"] == "miss"
    reference = {**MaskGrad.defaults, "grad_group": 8, "head_score": "summed"}
    assert MaskGrad().score_importance(run=run, params=reference).meta["cache"] == "miss"
    assert MaskGrad().score_importance(run=run, params=reference).meta["cache"] == "hit"
    # changed weights (e.g. a transform ran first) miss too
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert score().meta["cache"] == "miss"
    assert any(tmp_path.joinpath("mask-grad").iterdir())


@pytest.mark.real
def test_real_smollm2_scores_and_global_ratios() -> None:
    """On SmolLM2 (2 x 64 tokens): finite positive scores of the right shapes, and the
    global allocation built on them meets the budget and the cap."""
    from prunebench.harness.data import calibration_batch, load_corpus
    from prunebench.harness.models import load_source_model
    from prunebench.harness.params import model_shape
    from prunebench.plugins.global_allocation import GlobalAllocation, global_allocation

    src = load_source_model("smollm2-135m")
    model = to_pruned(src.model)
    ids = calibration_batch(src.tokenizer, load_corpus("wiki-offline"), 2, 64, 0)
    imp = mask_importance(model, lambda: iter([ids]), pca=True)
    assert len(imp.attention) == 30 and all(t.numel() == 9 for t in imp.attention)
    assert all(t.numel() == 1536 for t in imp.mlp) and all(t.numel() == 576 for t in imp.attention_channels)
    assert all(bool(torch.isfinite(t).all()) and float(t.min()) >= 0 for t in imp.mlp + imp.attention_channels)
    assert 1.0 < imp.meta["mean_loss"] < 6.0  # a trained model, not noise (ln 49152 = 10.8)
    shape = model_shape(model)
    alloc = global_allocation(imp, 0.3, shape, dict(GlobalAllocation.defaults))
    assert alloc.removed_params(shape) == pytest.approx(0.3 * shape.decoder_params, rel=1e-9)
    assert max(alloc.attention + alloc.mlp) <= 0.8 + 1e-12
    assert max(alloc.mlp) - min(alloc.mlp) > 0.05, "real importances give non-uniform ratios"
