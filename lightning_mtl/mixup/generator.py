"""The mask generator of AutoMix / AdAutoMix: cross-attention between the feature maps of the samples of a mix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MixMaskGenerator"]


class MixMaskGenerator(nn.Module):
    """Per-pixel mixing masks for ``K`` samples from their feature maps (Qin et al., "Adversarial
    AutoMixup", ICLR 2024, Sec. 3.2; after the Mix Block of Liu et al., "AutoMix: Unveiling the Power of
    Mixup for Stronger Classifiers", ECCV 2022).

    For the feature maps ``f_1 .. f_K`` (``[B, C, h, w]``, the same positions of the batch mixed
    together): 1x1 convolutions give queries and keys with ``C / reduction`` channels and a one-channel
    value per sample; sample ``i`` attends from its positions to the positions of the *other* samples,
    ``A_i = softmax(sum_{j != i} q_i k_j^T / sqrt(d))`` (``[B, hw, hw]``), and its mask logit map is
    ``A_i v_i``. The ``K`` logit maps are upsampled to the image size and a softmax across the samples
    makes the masks, so at every pixel the ``K`` weights are positive and sum to 1. With ``lam_concat``
    each feature map first gets its sample's lambda as a constant extra channel (AutoMix); AdAutoMix's
    published CIFAR setting leaves it out. The attention runs in float32 whatever the autocast context.

    The key and value convolutions have no bias: a key bias adds the same amount to every logit of an
    attention row, and a value bias (the rows sum to 1) the same amount to all ``K`` mask logits, so
    both softmaxes cancel them and their gradient is zero by construction. Checkpoints that still hold
    those two biases load with them dropped.

    Args:
        in_channels: channels ``C`` of the feature maps.
        reduction: ``C / d``.
        lam_concat: append each sample's lambda as a feature channel.
        use_scale: divide the attention logits by ``sqrt(d)``.
        upsample_mode: ``F.interpolate`` mode from ``h x w`` to the image size.
        init_std: standard deviation of the normal initialization of the convolutions (biases 0).
    """

    def __init__(
        self,
        in_channels: int = 256,
        reduction: int = 2,
        lam_concat: bool = False,
        use_scale: bool = True,
        upsample_mode: str = "bilinear",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if in_channels < 1 or reduction < 1:
            raise ValueError(f"in_channels and reduction must be positive, got {in_channels}, {reduction}")
        if upsample_mode not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"upsample_mode must be nearest, bilinear or bicubic, got {upsample_mode!r}")
        self.in_channels = int(in_channels)
        self.inner = max(in_channels // reduction, 1)
        self.lam_concat = bool(lam_concat)
        self.use_scale = bool(use_scale)
        self.upsample_mode = upsample_mode
        channels = in_channels + int(self.lam_concat)
        self.query = nn.Conv2d(channels, self.inner, 1)
        self.key = nn.Conv2d(channels, self.inner, 1, bias=False)
        self.value = nn.Conv2d(channels, 1, 1, bias=False)
        for conv in (self.query, self.key, self.value):
            nn.init.normal_(conv.weight, std=init_std)
        assert self.query.bias is not None  # built with a bias above
        nn.init.zeros_(self.query.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # earlier versions had key and value biases, which cannot change the masks (see the class docstring)
        for name in ("key.bias", "value.bias"):
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def logits(self, features: Sequence[Tensor], lam: Tensor) -> Tensor:
        """Mask logits ``[B, K, h, w]`` at the feature resolution."""
        if len(features) < 2:
            raise ValueError(f"a mix needs at least 2 feature maps, got {len(features)}")
        batch, channels, h, w = features[0].shape
        if channels != self.in_channels:
            raise ValueError(f"the generator expects {self.in_channels}-channel features, got {channels}")
        lam = lam.float().reshape(-1, len(features)).expand(batch, -1)
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            maps = [f.float() for f in features]
            if self.lam_concat:
                maps = [
                    torch.cat([f, lam[:, k, None, None, None].expand(batch, 1, h, w)], 1) for k, f in enumerate(maps)
                ]
            q = [self.query(f).flatten(2).transpose(1, 2) for f in maps]  # [B, hw, d]
            k = [self.key(f).flatten(2) for f in maps]  # [B, d, hw]
            v = [self.value(f).flatten(2).transpose(1, 2) for f in maps]  # [B, hw, 1]
            scale = self.inner**-0.5 if self.use_scale else 1.0
            out = []
            for i in range(len(maps)):
                # queries of sample i against the keys of every other sample of the mix
                energy = sum(q[i] @ k[j] for j in range(len(maps)) if j != i) * scale
                out.append((energy.softmax(dim=-1) @ v[i]).view(batch, 1, h, w))
            return torch.cat(out, dim=1)

    def forward(self, features: Sequence[Tensor], lam: Tensor, size: tuple[int, int]) -> Tensor:
        """Masks ``[B, K, H, W]`` (softmax across the ``K`` samples) at the image size ``(H, W)``."""
        logits = self.logits(features, lam)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            kwargs = {} if self.upsample_mode == "nearest" else {"align_corners": False}
            logits = F.interpolate(logits, size=tuple(size), mode=self.upsample_mode, **kwargs)
            return logits.softmax(dim=1)
