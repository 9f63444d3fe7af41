"""Channel scores that several methods share, computed one way (float64).

A public contract module: methods import it (never each other), so a score written
once here means the same thing in every method that names it.
"""

from __future__ import annotations

import torch


def wanda_channel_scores(weight: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """Wanda's structured score of each input channel j of a projection W [out, in]:
    mean over output rows of |W_ij| * sqrt(E[x_j^2]) (Wanda-sp, FLAP's WIFN, Olica's FFN)."""
    return weight.detach().abs().to(torch.float64).mean(0) * second_moment.to(torch.float64).clamp_min(0).sqrt()


def weighted_energy(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """energy_j * ||W[:, j]||^2 per input channel j: the output energy a channel carries
    (IntraSlice's Eq. 2 with E[x_j^2], FLAP's WIFV with the variance)."""
    return energy.to(torch.float64) * weight.detach().to(torch.float64).pow(2).sum(0)


def head_scores(scores: torch.Tensor, num_heads: int) -> torch.Tensor:
    """One score per query head: as given, or the sum of the head's o_proj-channel scores
    when the importance component scored channels (the contract allows both)."""
    s = scores.detach().to(torch.float64).flatten()
    if s.numel() == num_heads:
        return s
    if num_heads and s.numel() % num_heads == 0:
        return s.reshape(num_heads, -1).sum(1)
    raise ValueError(f"attention importance has {s.numel()} scores for {num_heads} heads")
