"""Slimmable task decoders: the task heads whose width a task preference controls."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.controllable.layers import SlimmableLinear

__all__ = ["SlimmableDecoder"]


class SlimmableDecoder(nn.Module):
    """A two-layer task head, ``Linear -> ReLU -> Linear``, whose hidden layer is slimmable.

    It reads as many features as the (slimmable) encoder gives at its active width; at width ``w`` the hidden
    layer keeps its first ``ceil(hidden * w)`` units; the output size is the task's and never changes.

    Args:
        in_features: encoder features of the widest network.
        out_features: the task's outputs.
        hidden: hidden units of the widest decoder.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.hidden = SlimmableLinear(in_features, hidden)
        self.act = nn.ReLU()
        self.out = SlimmableLinear(hidden, out_features, slim_output=False)
        self.out_features = out_features

    def forward(self, features: Tensor) -> Tensor:
        return self.out(self.act(self.hidden(features)))
