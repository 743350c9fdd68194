"""Evaluation mode and frozen buffers for the length of a block (floor 0: imports no family).

* :func:`eval_mode`: a module in eval mode, every submodule's own mode restored after it.
* :func:`restored_buffers`: extra forward passes (SAM's perturbed pass, F-MTL's per-task passes, the
  conflict monitor's probe) leave BatchNorm statistics and counters exactly as they found them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["eval_mode", "restored_buffers"]


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


@contextmanager
def restored_buffers(buffers: nn.Module | Iterable[Tensor]) -> Iterator[list[Tensor]]:
    """Copies of the buffers (a module's, or the tensors given) taken on entry are written back, in
    place and without autograd, when the block ends, also when it raises.

    The copy-back happens at the end of the block, not after the forward: BatchNorm's backward checks
    that its saved running statistics were not modified in between, so a block that also runs backward
    must enclose it.

    Args:
        buffers: a module (all its buffers) or the buffer tensors themselves.

    Yields:
        The list of buffers that will be restored.
    """
    tensors = list(buffers.buffers() if isinstance(buffers, nn.Module) else buffers)
    saved = [t.detach().clone() for t in tensors]
    try:
        yield tensors
    finally:
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)
