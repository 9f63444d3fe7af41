"""Greedy structured Optimal Brain Surgeon on one projection's input columns.

Shared by the SoBP-style methods (``baselines/sobp.py``, ``baselines/sobp_paper.py``): a
public contract module, so neither method imports the other.
"""

from __future__ import annotations

import math

import torch


def greedy_channels(weight: torch.Tensor, hinv: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``count`` single columns greedily by ||W[:, j]||^2 / [H^-1]_jj with OBS updates.

    Returns the removed columns (in removal order) and the updated W. Exactly the
    sequential algorithm (score, remove the cheapest column, update W and H^-1, repeat),
    but the updates are kept in factored form: after t removals
    W_t = W_0 - A C^T and H^-1_t = H^-1_0 - U U^T with one column per removal, so a step
    costs O(d n + t (d + n)) matrix-vector work instead of the O(n^2 + d n) of updating
    both matrices in place (about 5x faster on SmolLM2's FFN).
    """
    w0, h0 = weight.to(torch.float64), hinv.to(torch.float64)
    d, n = w0.shape
    count = min(count, n)
    a_cols = torch.zeros(d, count, dtype=torch.float64, device=w0.device)  # removed columns of W_t
    c_cols = torch.zeros(n, count, dtype=torch.float64, device=w0.device)  # their update rows
    u_cols = torch.zeros(n, count, dtype=torch.float64, device=w0.device)  # H^-1 downdates
    norms = w0.pow(2).sum(0)
    diag = h0.diagonal().clone()
    alive = torch.ones(n, dtype=torch.bool, device=w0.device)
    order: list[int] = []
    tiny = torch.finfo(torch.float64).tiny
    for t in range(count):
        score = norms / diag.clamp_min(tiny)
        score[~alive] = math.inf
        j = int(torch.argmin(score))
        h_row = h0[j] - u_cols[:, :t] @ u_cols[j, :t]  # row j of H^-1_t
        a = w0[:, j] - a_cols[:, :t] @ c_cols[j, :t]  # column j of W_t
        c = h_row / h_row[j]
        wta = w0.T @ a - c_cols[:, :t] @ (a_cols[:, :t].T @ a)  # W_t^T a
        norms = norms - 2 * c * wta + c.pow(2) * a.dot(a)
        a_cols[:, t], c_cols[:, t] = a, c
        u = h_row / h_row[j].clamp_min(tiny).sqrt()
        u_cols[:, t] = u
        diag = diag - u.pow(2)
        alive[j] = False
        order.append(j)
    new_w = w0 - a_cols @ c_cols.T
    removed = torch.as_tensor(order, dtype=torch.long)
    new_w[:, removed] = 0.0
    return removed, new_w
