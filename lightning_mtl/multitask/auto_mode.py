"""``gradient_mode="auto"``: the parameter or the Gramian level, by a rule fixed from measurements.

Measured with ``benchmarks/aggregation.py`` (one CPU thread, batch 32, UPGrad and MGDA; figures in
``docs/multitask.md``): the Gramian level took about 0.5-0.7x the parameter level's time on an
encoder of linear layers at m = 10, and lost on every convolutional encoder (1.07-1.4x, DigitsCNN,
m = 2 and 10), where its per-task weight gradients are the same work as the parameter level's; at
m = 2 neither won on every run. No GPU figure exists yet, so a GPU keeps the parameter level.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

# the smallest m at which the Gramian level won every measured run on linear encoders
AUTO_MIN_TASKS = 10
# the share of the encoder's trainable parameters that must sit in nn.Linear layers
AUTO_LINEAR_SHARE = 0.9


def choose_gradient_mode(
    encoder: nn.Module, num_tasks: int, gramian_weighting: bool, device: torch.device | str
) -> Literal["parameter", "gramian"]:
    """The level ``gradient_mode="auto"`` runs at.

    ``"gramian"`` when all of these hold, else ``"parameter"``:

    * the aggregator is a Gramian weighting without F-MTL (``gramian_weighting``);
    * the device is a CPU;
    * ``num_tasks >= AUTO_MIN_TASKS`` (10);
    * the encoder has no trainable convolution, and at least ``AUTO_LINEAR_SHARE`` (90 %) of its
      trainable parameters sit in ``nn.Linear`` layers.

    Args:
        encoder: the shared encoder.
        num_tasks: the number of tasks m.
        gramian_weighting: whether the aggregator is a Gramian weighting and F-MTL is off.
        device: where the step runs.

    Example:
        >>> mlp = nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512))
        >>> choose_gradient_mode(mlp, 10, True, "cpu"), choose_gradient_mode(mlp, 2, True, "cpu")
        ('gramian', 'parameter')
        >>> choose_gradient_mode(nn.Conv2d(1, 8, 3), 10, True, "cpu")
        'parameter'
    """
    if not gramian_weighting or torch.device(device).type != "cpu" or num_tasks < AUTO_MIN_TASKS:
        return "parameter"
    total = linear = 0
    for module in encoder.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if own and isinstance(module, nn.modules.conv._ConvNd):
            return "parameter"
        total += own
        linear += own if isinstance(module, nn.Linear) else 0
    return "gramian" if total and linear >= AUTO_LINEAR_SHARE * total else "parameter"


__all__ = ["AUTO_LINEAR_SHARE", "AUTO_MIN_TASKS", "choose_gradient_mode"]
