"""Controllable multi-task architectures: slimmable encoders and task decoders trained with the sandwich rule and
configuration-invariant distillation, FLOP counting per width configuration and the budget / preference search."""

from lightning_mtl.controllable.callback import ControllabilityEvaluation
from lightning_mtl.controllable.controllability import controllability, kendall_tau
from lightning_mtl.controllable.decoder import SlimmableDecoder
from lightning_mtl.controllable.digits_cnn import SlimmableDigitsCNN
from lightning_mtl.controllable.evaluation import (
    controllability_grid,
    evaluate_configuration,
    metric_choice,
    plot_controllability,
)
from lightning_mtl.controllable.flops import configuration_flops, count_flops
from lightning_mtl.controllable.layers import (
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
    copy_plain_weights,
    scaled_channels,
    set_width,
    slimmable_twin,
)
from lightning_mtl.controllable.module import ControllableMultiTaskModule
from lightning_mtl.controllable.resnet import SlimmableResNet18
from lightning_mtl.controllable.resnet_dilated import SlimmableDeepLabHead, SlimmableResNetDilated
from lightning_mtl.controllable.sampler import ConfigurationSampler, WidthConfig
from lightning_mtl.controllable.search import BudgetSearch, normalize_preference

__all__ = [
    "BudgetSearch",
    "ConfigurationSampler",
    "ControllabilityEvaluation",
    "ControllableMultiTaskModule",
    "SlimmableConv2d",
    "SlimmableDeepLabHead",
    "SlimmableDecoder",
    "SlimmableDigitsCNN",
    "SlimmableLinear",
    "SlimmableResNet18",
    "SlimmableResNetDilated",
    "SwitchableBatchNorm2d",
    "WidthConfig",
    "copy_plain_weights",
    "configuration_flops",
    "controllability",
    "controllability_grid",
    "count_flops",
    "evaluate_configuration",
    "kendall_tau",
    "metric_choice",
    "normalize_preference",
    "plot_controllability",
    "scaled_channels",
    "set_width",
    "slimmable_twin",
]
