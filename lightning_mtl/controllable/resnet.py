"""A slimmable CIFAR ResNet-18 whose widest configuration is the plain :class:`ResNet18`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_mtl.architectures import ResNet18
from lightning_mtl.controllable.layers import (
    SlimmableConv2d,
    SwitchableBatchNorm2d,
    check_width_mults,
    copy_plain_weights,
    scaled_channels,
)

__all__ = ["SlimmableResNet18"]


class _SlimmableBasicBlock(nn.Module):
    """The post-activation basic block with slimmable convolutions and switchable batch norm (the same
    attribute names as the plain block, so the weights line up)."""

    def __init__(self, cin: int, cout: int, stride: int, widths: Sequence[float]) -> None:
        super().__init__()
        self.conv1 = SlimmableConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = SwitchableBatchNorm2d(cout, widths)
        self.conv2 = SlimmableConv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = SwitchableBatchNorm2d(cout, widths)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # every layer runs at one width, so the identity and the projection keep matching channel counts
            conv = SlimmableConv2d(cin, cout, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(conv, SwitchableBatchNorm2d(cout, widths))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SlimmableResNet18(nn.Module):
    """:class:`~lightning_mtl.architectures.ResNet18` (CIFAR stem) with every convolution slimmable and switchable
    batch norm; at width ``w`` each stage keeps its first ``ceil(c * w)`` channels and the output has
    :meth:`features_at` ``(w)`` features. At width 1.0 it computes what a :class:`ResNet18` with the same weights
    computes (:meth:`from_resnet18`).

    Args:
        in_channels: input channels (the stem reads all of them at every width).
        width: channels of the first stage of the widest network.
        width_mults: the widths it is trained at.
    """

    def __init__(
        self, in_channels: int = 3, width: int = 64, width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    ) -> None:
        super().__init__()
        self.width_mults = check_width_mults(width_mults)
        self.conv1 = SlimmableConv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = SwitchableBatchNorm2d(width, self.width_mults)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i in range(4):
            cout = width * 2**i
            first = _SlimmableBasicBlock(cin, cout, 2 if i > 0 else 1, self.width_mults)
            stages.append(nn.Sequential(first, _SlimmableBasicBlock(cout, cout, 1, self.width_mults)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = cin
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features_at(self, width_mult: float) -> int:
        """Size of the output at width ``width_mult``."""
        return scaled_channels(self.out_features, width_mult)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return self.pool(x)

    @classmethod
    def from_resnet18(cls, net: ResNet18, width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> SlimmableResNet18:
        """A slimmable network holding the weights of a plain :class:`ResNet18` (narrower batch norms start
        from the first channels of the plain statistics and affine parameters)."""
        stem = net.conv1
        slim = cls(in_channels=stem.in_channels, width=stem.out_channels, width_mults=width_mults)
        copy_plain_weights(net, slim)
        return slim
