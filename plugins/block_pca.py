"""Block PCA for mask-gradient importance: block second moments, their eigenbases, and
scores of gradients in those bases (IntraSlice Eq. 11, as printed and exact).

Split from ``plugins/mask_grad.py`` (which runs the gradient pass) because it is plain
linear algebra on accumulated statistics: no model, no hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


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
    return scores_in_bases(grad_moments, [pca_bases(a, damping) for a in act_moments.matrices()])


def scores_in_bases(grad_moments: BlockMoments, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """diag(Q^T G Q) per block for given bases (one [k, b, b] tensor per entry of
    ``grad_moments.matrices()``), concatenated."""
    parts = [((g @ q) * q).sum(1).reshape(-1) for g, q in zip(grad_moments.matrices(), bases)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def group_grams(head_grams: torch.Tensor, head_to_kv: Sequence[int]) -> torch.Tensor:
    """Per query head, the summed Gram of its KV group's heads, [H, v, v] (float64).

    Under MHA every group is one head and the result equals the input exactly."""
    index = torch.as_tensor(list(head_to_kv), dtype=torch.long, device=head_grams.device)
    groups = int(index.max()) + 1 if index.numel() else 0
    sums = torch.zeros(groups, *head_grams.shape[1:], dtype=head_grams.dtype, device=head_grams.device)
    sums.index_add_(0, index, head_grams)
    return sums[index]


def rotate_masked(x: torch.Tensor, mask: torch.Tensor, bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """x + ((x Q) * mask) Q^T per block of the last dim (``bases``: [k, b, b] tensors, in order).

    At mask = 0 this is x exactly, and dL/dmask_j = sum_t (x_t Q)_j (delta_t Q)_j: the
    gradient of a mask on component j placed after the rotation (x -> x Q diag(m) Q^T
    at m = 1), what ``gradient="exact"`` scores.
    """
    flat = x.reshape(-1, x.shape[-1])
    parts, cut = [], 0
    for q in bases:
        k, b = int(q.shape[0]), int(q.shape[1])
        q = q.to(x.dtype)
        z = flat[:, cut : cut + k * b].reshape(-1, k, b).transpose(0, 1) @ q  # [k, n, b]
        m = mask[cut : cut + k * b].reshape(k, 1, b)
        parts.append(((z * m) @ q.transpose(1, 2)).transpose(0, 1).reshape(-1, k * b))
        cut += k * b
    return x + torch.cat(parts, 1).reshape(x.shape) if parts else x
