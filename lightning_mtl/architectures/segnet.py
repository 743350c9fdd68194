"""SegNet: a VGG-style encoder-decoder that predicts at the input resolution (the MTAN backbone)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["SegNet", "conv_bn_relu"]


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # no conv bias: the BatchNorm that follows subtracts it again (its gradient is zero by construction)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Block(nn.Module):
    """``n`` 3x3 conv-BN-ReLU layers; returns the output of the first one and of the last one (MTAN's
    attention masks look at the first and gate the last)."""

    def __init__(self, cin: int, cout: int, n: int) -> None:
        super().__init__()
        self.first = conv_bn_relu(cin, cout)
        self.rest = nn.Sequential(*[conv_bn_relu(cout, cout) for _ in range(n - 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = self.first(x)
        return u, self.rest(u)


class SegNet(nn.Module):
    """SegNet encoder-decoder: max-pooling with remembered indices down, max-unpooling with them up.

    Badrinarayanan, Kendall and Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder Architecture for
    Image Segmentation", TPAMI 2017; in the variant of MTAN (Liu, Johns and Davison, CVPR 2019), the shared
    backbone of the NYUv2 and Cityscapes experiments of MTAN, Nash-MTL and F-MTL: five encoder blocks of
    2, 2, 3, 3, 3 conv layers (64, 128, 256, 512, 512 channels), a mirrored decoder, ``channels[0]``
    output channels at the input resolution.

    :meth:`forward` returns the final ``[B, channels[0], H, W]`` map (hard sharing); :meth:`stages`
    returns every block's (first, last) conv outputs, which :class:`~lightning_mtl.architectures.mtan.MTAN`
    attends to. Inputs whose sides are not divisible by 32 are fine (unpooling restores each size).

    Args:
        in_channels: input channels.
        channels: width of each encoder block (the decoder mirrors them).
        convs: conv layers per block.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 128, 256, 512, 512),
        convs: Sequence[int] = (2, 2, 3, 3, 3),
    ) -> None:
        super().__init__()
        if len(channels) != len(convs) or not channels:
            raise ValueError(f"channels and convs need one entry per block, got {list(channels)} and {list(convs)}")
        self.channels = [int(c) for c in channels]
        self.convs = [int(n) for n in convs]
        c = self.channels
        self.encoder = nn.ModuleList(
            _Block(in_channels if j == 0 else c[j - 1], c[j], n) for j, n in enumerate(self.convs)
        )
        # decoder block j works at the resolution of encoder block j and narrows c[j] -> c[j - 1]
        self.decoder = nn.ModuleList(_Block(c[j], c[max(j - 1, 0)], n) for j, n in enumerate(self.convs))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.out_features = c[0]

    def stages(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(first, last)`` conv outputs of the encoder blocks 0..L-1, then of the decoder blocks L-1..0."""
        outputs, indices, sizes = [], [], []
        for block in self.encoder:
            u, p = block(x)
            outputs.append((u, p))
            sizes.append(p.shape[-2:])
            x, index = self.pool(p)
            indices.append(index)
        for j in reversed(range(len(self.decoder))):
            x = self.unpool(x, indices[j], output_size=sizes[j])
            u, x = self.decoder[j](x)
            outputs.append((u, x))
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)[-1][1]
