"""plugins/block_pca.py: block second moments, their eigenbases, scores in those bases,
KV-group Grams and the rotated mask, checked against direct computations."""

from __future__ import annotations

import torch

from prunebench.plugins.block_pca import BlockMoments, group_grams, pca_bases, rotate_masked, rotated_scores, scores_in_bases


def _data(n: int = 50, width: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_block_moments_are_the_diagonal_blocks_of_the_whole_gram():
    x = _data()
    moments = BlockMoments(10, 4)
    moments.update(x[:20])
    moments.update(x[20:])
    full, tail = moments.matrices()
    gram = x.T @ x
    assert torch.allclose(full[0], gram[:4, :4]) and torch.allclose(full[1], gram[4:8, 4:8])
    assert torch.allclose(tail[0], gram[8:, 8:])  # the remainder block of 2


def test_bases_are_orthonormal_eigenvectors_in_descending_order():
    x = _data()
    gram = (x.T @ x)[None]
    q = pca_bases(gram, damping=0.0)[0]
    assert torch.allclose(q.T @ q, torch.eye(10, dtype=torch.float64), atol=1e-10)
    values = torch.diagonal(q.T @ gram[0] @ q)
    assert torch.all(values[:-1] >= values[1:] - 1e-9)


def test_scores_in_a_basis_are_the_diagonal_of_the_rotated_gradient_gram():
    g = _data(seed=1)
    grads = BlockMoments(10, 10)
    grads.update(g)
    acts = BlockMoments(10, 10)
    acts.update(_data(seed=2))
    q = pca_bases(acts.matrices()[0], 0.01)[0]
    want = ((g @ q) ** 2).sum(0)
    assert torch.allclose(scores_in_bases(grads, [q[None]]), want)
    assert torch.allclose(rotated_scores(grads, acts, 0.01), want)


def test_group_grams_sum_the_heads_of_a_kv_group_and_are_the_identity_under_mha():
    grams = torch.stack([torch.eye(3, dtype=torch.float64) * (h + 1) for h in range(4)])
    assert torch.equal(group_grams(grams, [0, 1, 2, 3]), grams)
    grouped = group_grams(grams, [0, 0, 1, 1])
    assert torch.equal(grouped[0], grams[0] + grams[1]) and torch.equal(grouped[3], grams[2] + grams[3])


def test_the_rotated_mask_is_the_identity_at_zero_and_projects_out_a_component_at_minus_one():
    x = _data(n=5, width=6)
    q = pca_bases((_data(width=6).T @ _data(width=6))[None], 0.0)
    zero = torch.zeros(6, dtype=torch.float64)
    assert torch.equal(rotate_masked(x, zero, [q]), x)
    drop_first = zero.clone()
    drop_first[0] = -1.0
    out = rotate_masked(x, drop_first, [q])
    assert torch.allclose(out @ q[0][:, 0], torch.zeros(5, dtype=torch.float64), atol=1e-12)
