"""Controllable multi-task architectures: slimmable encoders and task decoders trained with the sandwich rule and
configuration-invariant distillation, FLOP counting per width configuration and the budget / preference search."""

from lightning_mtl.controllable.decoder import SlimmableDecoder
from lightning_mtl.controllable.digits_cnn import SlimmableDigitsCNN
from lightning_mtl.controllable.layers import (
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
    scaled_channels,
    set_width,
)
from lightning_mtl.controllable.module import ControllableMultiTaskModule
from lightning_mtl.controllable.sampler import ConfigurationSampler, WidthConfig

__all__ = [
    "ConfigurationSampler",
    "ControllableMultiTaskModule",
    "SlimmableConv2d",
    "SlimmableDecoder",
    "SlimmableDigitsCNN",
    "SlimmableLinear",
    "SwitchableBatchNorm2d",
    "WidthConfig",
    "scaled_channels",
    "set_width",
]
