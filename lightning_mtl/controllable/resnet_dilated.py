"""A slimmable dilated ResNet encoder and DeepLab-v3 head whose widest configuration is the plain network."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_mtl.architectures import DeepLabHead, ResNetDilated
from lightning_mtl.controllable.layers import SlimmableConv2d, check_width_mults, scaled_channels, slimmable_twin

__all__ = ["SlimmableDeepLabHead", "SlimmableResNetDilated"]


class SlimmableResNetDilated(ResNetDilated):
    """:class:`~lightning_mtl.architectures.ResNetDilated` with every convolution slimmable and switchable batch
    norm (Yu et al., "Slimmable Neural Networks", ICLR 2019): at width ``w`` every layer keeps its first
    ``ceil(c * w)`` channels (the stem reads all input channels) and the map has :meth:`features_at` ``(w)``
    channels. The timm network is built as in the plain class and its layers are swapped for slimmable twins
    holding the same weights, so at width 1.0 it computes what the plain network computes
    (:meth:`from_resnet_dilated` copies a given one).

    Args:
        model_name: a timm ResNet family name (``"resnet50"``, ``"resnet18"``, ...).
        checkpoint_path: local weights file of the plain network.
        in_chans: input channels.
        output_stride: 8, 16 or 32.
        width_mults: the widths it is trained at (1.0 included).
        model_kwargs: further keyword arguments of ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        checkpoint_path: str | None = None,
        in_chans: int = 3,
        output_stride: int = 8,
        width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model_name, checkpoint_path, in_chans, output_stride, model_kwargs)
        self.width_mults = check_width_mults(width_mults)
        slimmable_twin(self.model, self.width_mults)

    def features_at(self, width_mult: float) -> int:
        """Channels of the output map at width ``width_mult``."""
        return scaled_channels(self.out_features, width_mult)

    @classmethod
    def from_resnet_dilated(
        cls, net: ResNetDilated, width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    ) -> SlimmableResNetDilated:
        """A slimmable network holding the weights of ``net`` (its timm model is deep-copied, then converted)."""
        slim = cls.__new__(cls)
        nn.Module.__init__(slim)  # the timm model is the given one's, not a new one
        slim.model = copy.deepcopy(net.model)
        slim.out_features = net.out_features
        slim.width_mults = check_width_mults(width_mults)
        slimmable_twin(slim.model, slim.width_mults)
        return slim


class SlimmableDeepLabHead(DeepLabHead):
    """:class:`~lightning_mtl.architectures.DeepLabHead` (ASPP, Chen et al., arXiv:1706.05587) with slimmable
    branches, projection and 3x3 layer: at width ``w`` each branch has ``ceil(width * w)`` channels, the projection
    reads the first channels of each branch's block of weights, and the 1x1 classifier keeps its
    ``out_channels``. It reads as many channels as the (slimmable) encoder gives. At width 1.0 it computes what
    the plain head computes (:meth:`from_deeplab_head`).

    Args:
        in_channels: feature channels of the widest encoder.
        out_channels: outputs per pixel.
        rates: dilation rates of the 3x3 branches.
        width: channels of every branch and of the projection at width 1.0.
        width_mults: the widths it is trained at (the controllable module's ``decoder_widths``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (12, 24, 36),
        width: int = 256,
        width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    ) -> None:
        super().__init__(in_channels, out_channels, rates, width)
        self.width_mults = check_width_mults(width_mults)
        _make_slimmable(self, len(rates) + 2)

    @classmethod
    def from_deeplab_head(
        cls, head: DeepLabHead, width_mults: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    ) -> SlimmableDeepLabHead:
        """A slimmable head holding the weights of ``head`` (deep-copied, then converted)."""
        slim = copy.deepcopy(head)
        slim.__class__ = cls
        assert isinstance(slim, SlimmableDeepLabHead)
        slim.width_mults = check_width_mults(width_mults)
        _make_slimmable(slim, len(head.branches) + 1)
        return slim


def _make_slimmable(head: SlimmableDeepLabHead, parts: int) -> None:
    """Swap the head's layers for slimmable twins; the projection reads ``parts`` concatenated branches and the
    prediction layer keeps its output size."""
    slimmable_twin(head, head.width_mults)
    project = head.project[0]
    assert isinstance(project, SlimmableConv2d)
    project.in_groups = parts  # the concatenation of the branches, each slimmed on its own
    classifier = head.classifier[-1]
    assert isinstance(classifier, SlimmableConv2d)
    classifier.slim_output = False
