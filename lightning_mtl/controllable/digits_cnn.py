"""A slimmable version of the digits CNN whose widest configuration is the plain :class:`DigitsCNN`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor, nn

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.controllable.layers import (
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
    check_width_mults,
    copy_plain_weights,
    scaled_channels,
)

__all__ = ["SlimmableDigitsCNN"]


class SlimmableDigitsCNN(nn.Module):
    """:class:`~lightning_mtl.architectures.DigitsCNN` with slimmable convolutions, switchable batch norm and a
    slimmable projection.

    At width ``w`` every convolution keeps its first ``ceil(c * w)`` channels and the projection its first
    ``ceil(out_features * w)`` features, so the output has :meth:`features_at` ``(w)`` features. At width 1.0
    it computes exactly what a :class:`DigitsCNN` with the same weights computes (:meth:`from_digits_cnn`).

    Args:
        in_channels: input channels (1 for the digits).
        channels: widths of the two stages of the widest network.
        grid: side of the spatial grid kept before the projection.
        out_features: size of the shared representation of the widest network.
        width_mults: the widths it is trained at (switchable batch norm keeps statistics for each).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        grid: int = 3,
        out_features: int = 128,
        width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    ) -> None:
        super().__init__()
        self.width_mults = check_width_mults(width_mults)
        c1, c2 = channels
        widths = self.width_mults

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = SlimmableConv2d(cin, cout, 3, padding=1, bias=False)
            return [conv, SwitchableBatchNorm2d(cout, widths), nn.ReLU(inplace=True)]

        # the same indices as DigitsCNN.features, so the state dicts line up layer by layer
        self.features = nn.Sequential(
            *block(in_channels, c1), *block(c1, c1), nn.MaxPool2d(2), *block(c1, c2), *block(c2, c2),
            nn.AdaptiveAvgPool2d(grid),
        )  # fmt: skip
        # flattening is channel-major, so the first channels' cells are the first inputs of the projection
        self.project = nn.Sequential(
            nn.Flatten(), SlimmableLinear(c2 * grid * grid, out_features), nn.ReLU(inplace=True)
        )
        self.out_features = out_features

    def features_at(self, width_mult: float) -> int:
        """Size of the output at width ``width_mult``."""
        return scaled_channels(self.out_features, width_mult)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x))

    @classmethod
    def from_digits_cnn(
        cls, cnn: DigitsCNN, width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    ) -> SlimmableDigitsCNN:
        """A slimmable network holding the weights of a plain (for instance pre-trained) :class:`DigitsCNN`.

        The narrower batch norms start from the first channels of the plain network's statistics and affine
        parameters.
        """
        first, last = cnn.features[0], cnn.project[1]
        assert isinstance(first, nn.Conv2d) and isinstance(last, nn.Linear)  # DigitsCNN's layout
        convs = [m for m in cnn.features if isinstance(m, nn.Conv2d)]
        pool = cnn.features[-1]
        assert isinstance(pool, nn.AdaptiveAvgPool2d)
        size = pool.output_size  # an int, or a pair of sides
        grid = size if isinstance(size, int) else int(cast(Sequence[int], size)[0])
        slim = cls(
            in_channels=first.in_channels, channels=(convs[0].out_channels, convs[-1].out_channels),
            grid=grid,
            out_features=last.out_features, width_mults=width_mults,
        )  # fmt: skip
        copy_plain_weights(cnn, slim)
        return slim
