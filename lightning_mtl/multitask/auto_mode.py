"""``gradient_mode="auto"``: the parameter or the Gramian level, by a rule fixed from measurements.

Measured with ``benchmarks/aggregation.py`` (one CPU thread, UPGrad, MGDA and Nash-MTL, on a loaded
2-core machine; time of the Gramian level over the parameter level's, figures in ``docs/multitask.md``):
on an encoder of three 512-wide linear layers the Gramian level won every run with m >= 3 tasks at
batch 32 (0.51-0.92x), with m >= 4 at batch 64 (0.63-0.89x), lost at m = 4 from batch 128 on and at
m = 10 at batch 256 (1.01-1.16x), and neither won every run at m = 2; on the convolutional DigitsCNN
it lost at every m (1.16-1.29x), its per-task weight gradients being the parameter level's work. No
GPU figure exists yet, so a GPU keeps the parameter level.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

# the smallest m, and the largest batch, at which the Gramian level won every measured run (linear encoders)
AUTO_MIN_TASKS = 4
AUTO_MAX_ROWS = 64
# the share of the encoder's trainable parameters that must sit in nn.Linear layers
AUTO_LINEAR_SHARE = 0.9


def choose_gradient_mode(
    encoder: nn.Module, num_tasks: int, gramian_weighting: bool, device: torch.device | str, rows: int
) -> Literal["parameter", "gramian"]:
    """The level ``gradient_mode="auto"`` runs at.

    ``"gramian"`` when all of these hold, else ``"parameter"``:

    * the aggregator is a Gramian weighting without F-MTL (``gramian_weighting``);
    * the device is a CPU;
    * ``num_tasks >= AUTO_MIN_TASKS`` (4) and ``rows <= AUTO_MAX_ROWS`` (64);
    * the encoder has no trainable convolution, and at least ``AUTO_LINEAR_SHARE`` (90 %) of its
      trainable parameters sit in ``nn.Linear`` layers.

    Args:
        encoder: the shared encoder.
        num_tasks: the number of tasks m.
        gramian_weighting: whether the aggregator is a Gramian weighting and F-MTL is off.
        device: where the step runs.
            rows: the batch size (the rows each linear layer sees per step for a flat input; an encoder
            that applies its linear layers to every token of a sequence sees more, which was not measured).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512))
        >>> choose_gradient_mode(mlp, 10, True, "cpu", 32), choose_gradient_mode(mlp, 2, True, "cpu", 32)
        ('gramian', 'parameter')
        >>> choose_gradient_mode(mlp, 10, True, "cpu", 256), choose_gradient_mode(nn.Conv2d(1, 8, 3), 10, True, "cpu", 32)
        ('parameter', 'parameter')
    """
    if not gramian_weighting or torch.device(device).type != "cpu":
        return "parameter"
    if num_tasks < AUTO_MIN_TASKS or rows > AUTO_MAX_ROWS:
        return "parameter"
    total = linear = 0
    for module in encoder.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        if own and isinstance(module, nn.modules.conv._ConvNd):
            return "parameter"
        total += own
        linear += own if isinstance(module, nn.Linear) else 0
    return "gramian" if total and linear >= AUTO_LINEAR_SHARE * total else "parameter"


__all__ = ["AUTO_LINEAR_SHARE", "AUTO_MAX_ROWS", "AUTO_MIN_TASKS", "choose_gradient_mode"]
