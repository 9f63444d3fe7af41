"""prunebench.harness.stats: streamed moments and the damped PSD solve every method shares."""

from __future__ import annotations

import pytest
import torch

from prunebench.harness.stats import Moments, damped, solve_psd


def _psd(n: int, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, rank or n, dtype=torch.float64, generator=g) @ torch.randn(rank or n, n, dtype=torch.float64, generator=g)
    return x.T @ x


def test_moments_accumulate_like_the_whole_batch() -> None:
    x = torch.randn(5, 7, 6)
    m = Moments.empty(6, gram=True)
    for chunk in x.split(2):
        m.update(chunk)
    flat = x.reshape(-1, 6).to(torch.float64)
    assert m.count == 35
    torch.testing.assert_close(m.gram, flat.T @ flat, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(m.mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.variance, flat.var(0), rtol=1e-5, atol=1e-6)


def test_solve_psd_solves_the_damped_system() -> None:
    a, b = _psd(12), torch.randn(12, 5, dtype=torch.float64)
    x = solve_psd(a, b, 0.01)
    torch.testing.assert_close(damped(a, 0.01) @ x, b, rtol=1e-8, atol=1e-8)


def test_solve_psd_in_place_and_column_blocks_give_the_same_solution() -> None:
    """overwrite_a (damp the caller's matrix instead of a copy) and column_chunk (solve B a
    block at a time) are memory options only: the same solution (bitwise in place; to
    float64 rounding in blocks, where BLAS blocks the triangular solves differently)."""
    a, b = _psd(40), torch.randn(40, 23, dtype=torch.float64)
    reference = solve_psd(a, b, 0.05)
    given_up = a.clone()
    torch.testing.assert_close(solve_psd(given_up, b, 0.05, overwrite_a=True), reference, rtol=0, atol=0)
    assert not torch.equal(given_up, a)  # its diagonal carries the damping now
    torch.testing.assert_close(solve_psd(a, b, 0.05, column_chunk=7), reference, rtol=1e-12, atol=1e-15)
    blocks32 = solve_psd(a, b, 0.05, out_dtype=torch.float32, column_chunk=7)
    assert blocks32.dtype == torch.float32
    torch.testing.assert_close(blocks32, reference.to(torch.float32), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("overwrite", [False, True])
def test_solve_psd_survives_a_singular_matrix(overwrite: bool) -> None:
    """Dead channels (zero rows and columns) make A singular without damping; the solve
    raises the damping until Cholesky succeeds, in place or not, with the same answer."""
    a = _psd(10, rank=4)
    a[3], a[:, 3] = 0.0, 0.0
    b = torch.randn(10, 3, dtype=torch.float64)
    copy_path = solve_psd(a, b, 0.0)
    in_place = solve_psd(a.clone(), b, 0.0, overwrite_a=overwrite)
    assert torch.isfinite(copy_path).all()
    torch.testing.assert_close(in_place, copy_path, rtol=1e-12, atol=1e-12)
