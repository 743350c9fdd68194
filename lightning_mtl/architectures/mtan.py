"""MTAN: a shared SegNet plus one soft-attention branch per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.architectures._base import MultiTaskArchitecture, TaskHead
from lightning_mtl.architectures.segnet import SegNet, conv_bn_relu

__all__ = ["MTAN"]


def _mask(cin: int, cout: int) -> nn.Sequential:
    """Attention mask: 1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid (values in (0, 1), one per channel and pixel)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Sigmoid(),
    )  # fmt: skip


class _Attention(nn.Module):
    """One task's attention branch over the shared stage features (the task-specific part of MTAN).

    ``shared_convs`` are MTAN's 3x3 convs between stages, which all branches share: they are parameters of
    the :class:`MTAN` encoder (shared), kept here by reference only, so they are not counted as this task's.
    """

    def __init__(self, channels: list[int], shared_convs: tuple[nn.ModuleList, nn.ModuleList]) -> None:
        super().__init__()
        c, n = channels, len(channels)
        # encoder stage j: mask from [first conv output u_j, previous attended features] (c_j each)
        self.enc_masks = nn.ModuleList(_mask(c[0] if j == 0 else 2 * c[j], c[j]) for j in range(n))
        # decoder stage j (j = n-1 .. 0), widths c[j-1]: mask from [u'_j, upsampled attended features]
        self.dec_masks = nn.ModuleList(_mask(2 * c[max(j - 1, 0)], c[max(j - 1, 0)]) for j in range(n))
        self._shared = shared_convs  # a tuple: not registered as this module's parameters

    def forward(self, stages: list[tuple[Tensor, Tensor]]) -> Tensor:
        enc_convs, dec_convs = self._shared
        n = len(self.enc_masks)
        attended = None
        for j in range(n):
            u, p = stages[j]
            a = self.enc_masks[j](u if attended is None else torch.cat([u, attended], 1)) * p
            attended = F.max_pool2d(enc_convs[j](a), 2, 2)
        assert attended is not None  # the encoder loop ran: an MTAN has at least one stage
        for step, j in enumerate(reversed(range(n))):
            u, p = stages[n + step]
            up = dec_convs[j](F.interpolate(attended, size=u.shape[-2:], mode="bilinear", align_corners=True))
            attended = self.dec_masks[j](torch.cat([u, up], 1)) * p
        return attended


class MTAN(MultiTaskArchitecture):
    """Multi-Task Attention Network: task-specific soft-attention masks over a shared SegNet.

    Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. Every encoder and
    decoder block of the shared :class:`~lightning_mtl.architectures.segnet.SegNet` feeds each task's
    attention branch: a mask computed from the block's first conv output (and the branch's features from
    the previous block) multiplies the block's last conv output. The branch of a task ends at full
    resolution with ``channels[0]`` features, which go to that task's output head.

    Shared (aggregated by gradient methods): the SegNet and the 3x3 convs between attention stages.
    Task-specific (ordinary gradients): the masks of each branch and the task's output head.

    Args:
        backbone: the shared :class:`~lightning_mtl.architectures.segnet.SegNet` (default: the MTAN size).
    """

    def __init__(self, backbone: SegNet | None = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else SegNet()
        if not isinstance(self.backbone, SegNet):
            raise TypeError(
                f"MTAN needs a SegNet backbone (it attends to its blocks), got {type(self.backbone).__name__}"
            )
        c, n = self.backbone.channels, len(self.backbone.channels)
        self.enc_convs = nn.ModuleList(conv_bn_relu(c[j], c[min(j + 1, n - 1)]) for j in range(n))
        self.dec_convs = nn.ModuleList(
            conv_bn_relu(c[n - 1] if j == n - 1 else c[j], c[max(j - 1, 0)]) for j in range(n)
        )
        self.out_features = c[0]

    def forward(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        return self.backbone.stages(x)

    def build_task_head(self, name: str, head: nn.Module) -> nn.Module:
        return TaskHead(_Attention(self.backbone.channels, (self.enc_convs, self.dec_convs)), head)
