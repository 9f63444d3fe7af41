"""Streaming activation statistics: never store whole activations, accumulate moments.

Per batch the products are formed in float32 (fast on CPU/GPU) and added to float64
accumulators, so summing many batches loses no precision; decompositions downstream run
in float64 on these accumulators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SITES = (
    "layer_in",  # decoder layer input (residual stream)
    "attn_in",  # normed input of the attention (input of q/k/v)
    "q_out",  # q_proj output, before RoPE (per head: [pair firsts | pair seconds | pass])
    "k_out",  # k_proj output, before RoPE
    "v_out",  # v_proj output
    "o_in",  # o_proj input: the concatenated head outputs
    "attn_out",  # o_proj output
    "mid",  # residual stream after attention (input of the post-attention norm)
    "mlp_in",  # normed input of the MLP (input of gate/up)
    "down_in",  # down_proj input: the intermediate activations
    "mlp_out",  # MLP output
    "layer_out",  # decoder layer output
)
"""Where statistics can be taken, named on the canonical layer (any architecture)."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype batch products are formed in: float32 for float32 and 16-bit inputs
    (fast), float64 for float64 inputs, so a float64 run (the regression protocol, where
    rounding must not depend on the CPU's kernels) stays float64 end to end."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclass
class Moments:
    """Count, sum, sum of squares and (optionally) the Gram matrix X^T X of one site."""

    count: int
    sum: torch.Tensor
    sq_sum: torch.Tensor
    gram: torch.Tensor | None = None

    @classmethod
    def empty(cls, dim: int, gram: bool, device: torch.device | str = "cpu") -> Moments:
        z = torch.zeros(dim, dtype=torch.float64, device=device)
        return cls(0, z.clone(), z.clone(), torch.zeros(dim, dim, dtype=torch.float64, device=device) if gram else None)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
        self.count += x.shape[0]
        self.sum += x.sum(0).to(torch.float64)
        self.sq_sum += x.pow(2).sum(0).to(torch.float64)
        if self.gram is not None:
            # Added in place from the float32 product: no float64 temporary of the Gram's
            # size (254 MB for a 5632-wide FFN). The widening is exact, so the sum is the same.
            self.gram += x.T @ x

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x_j^2] per channel (Wanda's ||x_j||^2 / n)."""
        return self.sq_sum / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased per-channel variance over all tokens (FLAP's fluctuation)."""
        n = self.count
        if n < 2:
            return torch.zeros_like(self.sum)
        return ((self.sq_sum - self.sum.pow(2) / n) / (n - 1)).clamp_min(0.0)

    def covariance(self, centered: bool = False) -> torch.Tensor:
        """X^T X / n (uncentred, as SliceGPT and IntraSlice use) or the centred covariance."""
        if self.gram is None:
            raise ValueError("Gram matrix was not collected for this site (request gram=True)")
        n = max(self.count, 1)
        cov = self.gram / n
        if centered:
            m = self.mean
            cov = cov - torch.outer(m, m)
        return cov


def damped(matrix: torch.Tensor, relative: float) -> torch.Tensor:
    """matrix + relative * mean(diag) * I: the damping every decomposition here uses."""
    diag_mean = matrix.diagonal().mean().clamp_min(torch.finfo(matrix.dtype).tiny)
    out = matrix.clone()  # the diagonal in place: no identity matrix of the same size is built
    out.diagonal().add_(relative * diag_mean)
    return out


def solve_psd(
    a: torch.Tensor,
    b: torch.Tensor,
    damping: float,
    out_dtype: torch.dtype | None = None,
    column_chunk: int | None = None,
    overwrite_a: bool = False,
) -> torch.Tensor:
    """Solve (A + damping) X = B for symmetric PSD A in float64, with a fallback.

    Cholesky first; if A is still singular after damping (e.g. dead channels), the
    damping grows tenfold up to three times, then a least-squares solve is used.
    ``column_chunk`` solves B a block of columns at a time (each block widened to float64
    and the solution narrowed to ``out_dtype`` as it goes), so no float64 copy of a wide
    B or X exists: for a [K, D] right-hand side of a wide FFN that is hundreds of MB.
    ``overwrite_a`` lets the solve damp a float64 ``a`` in place instead of copying it (the
    caller gives it up: its diagonal is changed afterwards); the result is the same.
    """
    a64 = a.to(torch.float64)
    lam = damping
    if overwrite_a or a64.data_ptr() != a.data_ptr():  # a copy made here is ours to damp in place
        diag = a64.diagonal()
        diag_mean = diag.mean().clamp_min(torch.finfo(a64.dtype).tiny)
        original = diag.clone()
        for _ in range(4):
            diag.copy_(original).add_(lam * diag_mean)  # the same A + lam * mean(diag A) * I as damped()
            chol, info = torch.linalg.cholesky_ex(a64)
            if int(info) == 0:
                del a64, diag
                return _cholesky_solve_columns(b, chol, out_dtype, column_chunk)
            lam = max(lam * 10, 1e-6)
        diag.copy_(original)
        return _lstsq(a64, b, lam, out_dtype)
    for _ in range(4):
        chol, info = torch.linalg.cholesky_ex(damped(a64, lam))
        if int(info) == 0:
            return _cholesky_solve_columns(b, chol, out_dtype, column_chunk)
        lam = max(lam * 10, 1e-6)
    return _lstsq(a64, b, lam, out_dtype)


def _cholesky_solve_columns(
    b: torch.Tensor, chol: torch.Tensor, out_dtype: torch.dtype | None, column_chunk: int | None
) -> torch.Tensor:
    if not column_chunk or column_chunk >= b.shape[1]:
        x = torch.cholesky_solve(b.to(torch.float64), chol)
        return x if out_dtype is None else x.to(out_dtype)
    out = torch.empty(b.shape, dtype=out_dtype or torch.float64, device=b.device)
    for s in range(0, b.shape[1], column_chunk):
        out[:, s : s + column_chunk] = torch.cholesky_solve(b[:, s : s + column_chunk].to(torch.float64), chol)
    return out


def _lstsq(a64: torch.Tensor, b: torch.Tensor, lam: float, out_dtype: torch.dtype | None) -> torch.Tensor:
    """The last resort of ``solve_psd``: least squares on the most damped matrix."""
    x = torch.linalg.lstsq(damped(a64, lam), b.to(torch.float64)).solution
    return x if out_dtype is None else x.to(out_dtype)


def eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, in float64."""
    vals, vecs = torch.linalg.eigh(matrix.to(torch.float64))
    return vals.flip(0), vecs.flip(1)
