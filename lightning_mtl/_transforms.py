"""The common tail of the package's picklable image transforms (floor 0: imports no family).

The SSL augmentations and the continual ViT transforms both end in "float32 in [0, 1], then
``Normalize(mean, std)`` when both are given"; each family subclasses :class:`ComposedTransform`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["ComposedTransform", "to_float_steps"]


def to_float_steps(mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Any]:
    """``v2`` steps to a float32 image in [0, 1], then ``Normalize(mean, std)`` when both are given.

    Raises:
        ValueError: only one of ``mean`` / ``std`` is given, or their lengths differ.
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for normalization, or neither")
    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        steps.append(v2.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std]))
    return steps


class ComposedTransform:
    """``v2.Compose`` of ``steps``, then float32 in [0, 1] and ``Normalize(mean, std)`` when both are given.

    A plain object (not an ``nn.Module``), so data loader workers can pickle it.

    Args:
        steps: the ``v2`` transforms that run first.
        mean, std: per-channel normalization (both or neither; None keeps [0, 1]).
    """

    def __init__(self, steps: list[Any], mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        self.transform = v2.Compose([*steps, *to_float_steps(mean, std)])

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"
