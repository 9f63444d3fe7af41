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
