"""A module in eval mode for the length of a block, every submodule's own mode restored after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; afterwards each submodule gets back its own mode, so a part the
    module holds in eval mode during training (a frozen backbone) stays there. The evaluation callbacks
    (kNN, linear probe, anytime accuracy) and OVOR's head phase run inside it."""
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for sub, mode in modes:
            sub.training = mode
