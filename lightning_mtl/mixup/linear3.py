"""Linear mix of three samples (the plain 3-sample mixup term of AdAutoMix)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from lightning_mtl.mixup._base import BatchMix, MixedBatch, sample_beta

__all__ = ["ThreeSampleMixup"]


class ThreeSampleMixup(BatchMix):
    """Linear mix of three samples: ``x = w_1 x_i + w_2 x_j + w_3 x_l`` with ``j, l`` two random
    permutations of the batch and ``w = (b_1, b_2, b_3) / sum(b)``, ``b_k ~ Beta(alpha, alpha)``, one draw
    per batch; the labels mix with the same weights.

    This is the plain 3-way mixup that Qin et al. ("Adversarial AutoMixup", ICLR 2024) use in place of half
    of the clean term when their generator mixes three samples; the lambdas are drawn and normalized as
    they do. Mixing more than two samples linearly goes back to mixup's own discussion (Zhang et al.,
    ICLR 2018).

    Args:
        alpha: Beta parameter of each unnormalized weight.
        prob: probability that a batch is mixed at all.
    """

    num_sources = 3

    def __init__(self, alpha: float = 1.0, prob: float = 1.0) -> None:
        super().__init__(prob)
        if alpha <= 0:
            raise ValueError(f"ThreeSampleMixup alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    def mix(self, inputs: Tensor) -> MixedBatch:
        self._check(inputs)
        batch = inputs.shape[0]
        draws = sample_beta(self.alpha, 3, device=inputs.device)
        w = draws / draws.sum()
        index = torch.arange(batch, device=inputs.device)
        sources = torch.stack([index, torch.randperm(batch, device=inputs.device),
                               torch.randperm(batch, device=inputs.device)], dim=1)  # fmt: skip
        # a sum of tensors is a tensor (typeshed's sum starts from the int 0)
        mixed = cast(Tensor, sum(w[k].to(inputs.dtype) * inputs[sources[:, k]] for k in range(3)))
        return MixedBatch(mixed, sources, w.expand(batch, 3).contiguous())
