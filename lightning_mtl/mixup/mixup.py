"""Mixup: convex combination of two images and of their labels."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.mixup._base import BatchMix, MixedBatch, sample_beta

__all__ = ["Mixup"]


class Mixup(BatchMix):
    """Mixup (Zhang, Cisse, Dauphin and Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

    ``x = lam * x_i + (1 - lam) * x_j`` with ``j`` a random permutation of the batch and
    ``lam ~ Beta(alpha, alpha)``, one draw per batch as in the paper's code; the labels mix with the same
    weights. The mixup papers on CIFAR use ``alpha = 1`` (AutoMix / AdAutoMix tables) or 0.2-1.

    Args:
        alpha: Beta parameter.
        prob: probability that a batch is mixed at all.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0) -> None:
        super().__init__(prob)
        if alpha <= 0:
            raise ValueError(f"Mixup alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    def mix(self, inputs: Tensor) -> MixedBatch:
        self._check(inputs)
        batch = inputs.shape[0]
        lam = sample_beta(self.alpha, device=inputs.device)
        perm = torch.randperm(batch, device=inputs.device)
        mixed = lam.to(inputs.dtype) * inputs + (1 - lam.to(inputs.dtype)) * inputs[perm]
        index = torch.arange(batch, device=inputs.device)
        weights = torch.stack([lam.expand(batch), 1 - lam.expand(batch)], dim=1)
        return MixedBatch(mixed, torch.stack([index, perm], dim=1), weights)
