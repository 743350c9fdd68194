"""ResNet-18 and PreAct-ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool).

The stem keeps 32x32 inputs at full resolution in the first stage, as in the CIFAR experiments of the
ResNet papers and of the mixup literature (Mixup, CutMix, AutoMix, AdAutoMix all train this network).
Both are encoders: ``forward`` returns the globally pooled ``[B, 512]`` features (``out_features``); the
stages are the submodules ``layer1`` .. ``layer4`` (feature maps at strides 1, 2, 4, 8), so a forward hook
on ``layer3`` reads the stage-3 map that AutoMix / AdAutoMix's generator uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["PreActResNet18", "ResNet18", "CifarResNet"]


class _BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., ECCV 2016): BN-ReLU-conv twice, identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        # the projection shortcut reads the pre-activated input, the identity one the raw input
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class CifarResNet(nn.Module):
    """A ResNet with the CIFAR stem, four stages of basic blocks and global average pooling.

    Args:
        blocks: blocks per stage.
        preact: pre-activation blocks (PreAct-ResNet) instead of post-activation ones.
        in_channels: input channels.
        width: channels of the first stage (doubled at each later stage).
    """

    def __init__(
        self, blocks: Sequence[int] = (2, 2, 2, 2), preact: bool = False, in_channels: int = 3, width: int = 64
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be four positive counts, got {list(blocks)}")
        block = _PreActBlock if preact else _BasicBlock
        self.preact = bool(preact)
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        # the pre-activation network normalizes inside its first block; the plain one right after the stem
        self.bn1: nn.Module = nn.Identity() if preact else nn.BatchNorm2d(width)
        self.relu = nn.Identity() if preact else nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, count in enumerate(blocks):
            cout = width * 2**i
            layers = []
            for j in range(count):
                layers.append(block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # a pre-activation network ends with the BN-ReLU that its last block leaves out
        self.final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = cin
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The feature maps after each of the four stages."""
        x = self.relu(self.bn1(self.conv1(x)))
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.final(self.forward_stages(x)[-1]))


class ResNet18(CifarResNet):
    """ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) with the CIFAR
    stem: 3x3 stride-1 stem convolution, no max-pool, stages of 64/128/256/512 channels; an encoder
    with ``out_features = 512``.

    Args:
        in_channels: input channels.
        width: channels of the first stage.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__((2, 2, 2, 2), preact=False, in_channels=in_channels, width=width)


class PreActResNet18(CifarResNet):
    """PreAct-ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016) with the
    CIFAR stem, the network of the Mixup and CutMix CIFAR experiments; an encoder with
    ``out_features = 512``.

    Args:
        in_channels: input channels.
        width: channels of the first stage.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__((2, 2, 2, 2), preact=True, in_channels=in_channels, width=width)
