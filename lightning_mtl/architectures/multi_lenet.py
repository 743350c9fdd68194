"""MultiLeNet: the LeNet-style shared encoder and task heads of the Multi-MNIST benchmarks."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LeNetHead", "MultiLeNet"]


class MultiLeNet(nn.Module):
    """LeNet encoder of Sener and Koltun's Multi-MNIST experiments.

    Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018 (after LeCun et al.,
    "Gradient-Based Learning Applied to Document Recognition", Proc. IEEE 1998); reused by Pareto MTL
    (Lin et al., NeurIPS 2019) on 36x36 Multi-MNIST / Multi-Fashion images. Two 5x5 convolutions (10 and 20
    channels), each followed by 2x2 max-pooling and ReLU, then a linear layer to ``out_features`` with ReLU
    (the flattened size follows from ``image_size``: 320 for 28x28, 720 for 36x36).

    Args:
        image_size: side of the square input.
        in_channels: input channels.
        out_features: size of the shared representation (50 in the papers).
    """

    def __init__(self, image_size: int = 36, in_channels: int = 1, out_features: int = 50) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"MultiLeNet needs images of at least 16 pixels a side, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
        )  # fmt: skip
        self.project = nn.Sequential(nn.Linear(20 * side * side, out_features), nn.ReLU())
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x))


class LeNetHead(nn.Module):
    """The task head of the same experiments: linear, ReLU, linear to the classes (50 hidden units).

    Args:
        in_features: size of the shared representation.
        num_classes: outputs.
        hidden: hidden units.
    """

    def __init__(self, in_features: int = 50, num_classes: int = 10, hidden: int = 50) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
