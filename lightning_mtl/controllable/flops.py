"""FLOPs of a width configuration, counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_mtl._modes import eval_mode
from lightning_mtl.controllable.sampler import ENCODER

__all__ = ["configuration_flops", "count_flops"]


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of ``fn(*args)`` as ``FlopCounterMode`` counts them: matrix products and convolutions, two per
    multiply-add (normalizations and activations are not counted)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def configuration_flops(module: Any, config: Mapping[str, float], inputs: Tensor) -> dict[str, int]:
    """FLOPs of each part of a :class:`~lightning_mtl.controllable.ControllableMultiTaskModule` at ``config`` on
    ``inputs``: ``{"encoder": ..., <task>: ..., "total": ...}``. The module's configuration and train/eval mode
    are restored afterwards."""
    kept = module.configuration
    module.set_configuration(config)
    try:
        with torch.no_grad(), eval_mode(module):
            encoder: nn.Module = module.encoder
            features = encoder(inputs)
            counts = {ENCODER: count_flops(encoder, inputs)}
            for name in module.task_names:
                counts[name] = count_flops(module.heads[name], features)
    finally:
        module.set_configuration(kept)
    counts["total"] = sum(counts.values())
    return counts
