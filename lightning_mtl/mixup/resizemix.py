"""ResizeMix: paste a whole resized image; labels weighted by the share of pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mtl.mixup._base import BatchMix, MixedBatch

__all__ = ["ResizeMix"]


class ResizeMix(BatchMix):
    """ResizeMix (Qin, Fang, Zhu, Liu, Huang and Liu, "ResizeMix: Mixing Data with Preserved Object
    Information and True Labels", arXiv:2012.11101, 2020).

    A permuted sample is shrunk by ``tau ~ U(scale_min, scale_max)`` (bilinear) to ``int(tau H) x
    int(tau W)`` and pasted at a uniformly random position; its label weight is the pasted share of
    pixels, the image's own label keeps the rest. The paper uses ``tau`` in [0.1, 0.8].

    Args:
        scale_min: smallest scale ``tau``.
        scale_max: largest scale ``tau``.
        prob: probability that a batch is mixed at all.
    """

    def __init__(self, scale_min: float = 0.1, scale_max: float = 0.8, prob: float = 1.0) -> None:
        super().__init__(prob)
        if not 0.0 < scale_min <= scale_max <= 1.0:
            raise ValueError(f"ResizeMix needs 0 < scale_min <= scale_max <= 1, got {scale_min}, {scale_max}")
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)

    def mix(self, inputs: Tensor) -> MixedBatch:
        self._check(inputs)
        batch, _, height, width = inputs.shape
        tau = self.scale_min + (self.scale_max - self.scale_min) * float(torch.rand(()))
        h, w = max(1, int(tau * height)), max(1, int(tau * width))
        top, left = int(torch.randint(height - h + 1, ())), int(torch.randint(width - w + 1, ()))
        perm = torch.randperm(batch, device=inputs.device)
        small = F.interpolate(inputs[perm], size=(h, w), mode="bilinear", align_corners=False)
        mixed = inputs.clone()
        mixed[:, :, top : top + h, left : left + w] = small.to(inputs.dtype)
        pasted = h * w / (height * width)
        index = torch.arange(batch, device=inputs.device)
        weights = torch.tensor([1.0 - pasted, pasted], device=inputs.device).expand(batch, 2).contiguous()
        return MixedBatch(mixed, torch.stack([index, perm], dim=1), weights)
