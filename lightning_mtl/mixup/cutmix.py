"""CutMix: paste a box of another image; labels weighted by the share of pixels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_mtl.mixup._base import BatchMix, MixedBatch, sample_beta

__all__ = ["CutMix", "random_box"]


def random_box(height: int, width: int, area: float) -> tuple[int, int, int, int]:
    """A box ``(top, bottom, left, right)`` of about ``area`` times the image, uniformly placed centre,
    clipped at the borders (so it can be smaller than asked; callers use its true area)."""
    ratio = math.sqrt(max(0.0, min(1.0, area)))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


class CutMix(BatchMix):
    """CutMix (Yun, Han, Oh, Chun, Choe and Yoo, "CutMix: Regularization Strategy to Train Strong
    Classifiers with Localizable Features", ICCV 2019).

    ``lam ~ Beta(alpha, alpha)``; a box of area ``(1 - lam) H W`` (uniform centre, clipped at the border)
    of a permuted sample replaces the same box of each image; the label weights are the **actual** pixel
    shares after clipping, ``1 - box / (H W)`` for the image's own label, as in the paper's code.

    Args:
        alpha: Beta parameter (1 in the paper's ImageNet / CIFAR runs; OpenMixup's CIFAR-100 benchmark,
            whose table AdAutoMix reports, uses 0.2).
        prob: probability that a batch is mixed at all (the paper's ``cutmix_prob``).
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0) -> None:
        super().__init__(prob)
        if alpha <= 0:
            raise ValueError(f"CutMix alpha must be positive, got {alpha}")
        self.alpha = float(alpha)

    def mix(self, inputs: Tensor) -> MixedBatch:
        self._check(inputs)
        batch, _, height, width = inputs.shape
        lam = float(sample_beta(self.alpha))
        top, bottom, left, right = random_box(height, width, 1.0 - lam)
        perm = torch.randperm(batch, device=inputs.device)
        mixed = inputs.clone()
        mixed[:, :, top:bottom, left:right] = inputs[perm, :, top:bottom, left:right]
        own = 1.0 - (bottom - top) * (right - left) / (height * width)
        index = torch.arange(batch, device=inputs.device)
        weights = torch.tensor([own, 1.0 - own], device=inputs.device).expand(batch, 2).contiguous()
        return MixedBatch(mixed, torch.stack([index, perm], dim=1), weights)
