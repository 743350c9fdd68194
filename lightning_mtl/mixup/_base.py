"""What every batch mix shares: the description of a mix (which samples, with which weights) and the
mixing of the labels of every task alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchMix", "MixedBatch", "mix_targets", "sample_beta"]


@dataclass
class MixedBatch:
    """A mixed batch.

    Attributes:
        inputs: the mixed images ``[B, C, H, W]``.
        sources: ``[B, k]`` long, the batch indices of the ``k`` samples mixed into each output sample.
        weights: ``[B, k]`` float, the share of each source in each output sample (label weights: they
            sum to 1 over ``k`` and, for the cut-and-paste mixes, equal the share of pixels).
    """

    inputs: Tensor
    sources: Tensor
    weights: Tensor

    @property
    def lam(self) -> Tensor:
        """``[B]`` the weight of each sample's own (first) source."""
        return self.weights[:, 0]


def sample_beta(alpha: float, size: int = 1, device: torch.device | None = None) -> Tensor:
    """``size`` draws from Beta(alpha, alpha) (torch's global generator, so ``seed_everything`` seeds it)."""
    if alpha <= 0:
        raise ValueError(f"the Beta parameter alpha must be positive, got {alpha}")
    draws = torch.distributions.Beta(float(alpha), float(alpha)).sample((size,)).float()
    return draws.to(device) if device is not None else draws


@overload
def mix_targets(targets: Tensor, mixed: MixedBatch, num_classes: int | Mapping[str, int | None] | None) -> Tensor: ...


@overload
def mix_targets(
    targets: Mapping[str, Tensor], mixed: MixedBatch, num_classes: int | Mapping[str, int | None] | None
) -> dict[str, Tensor]: ...


def mix_targets(
    targets: Tensor | Mapping[str, Tensor], mixed: MixedBatch, num_classes: int | Mapping[str, int | None] | None
) -> Tensor | dict[str, Tensor]:
    """The label mixture of every task, with the same sources and weights as the images.

    Integer class labels become probability rows ``[B, num_classes]`` (``sum_k w_k onehot(y[s_k])``); a
    row whose sources include a missing label (negative) is ``NaN`` (left out of the loss). Floating-point
    labels (multi-label 0/1, regression values) are mixed linearly with the same weights, and ``NaN``
    (missing) propagates. Probability rows ``[B, C]`` (an earlier mix) are mixed linearly as well.

    Args:
        targets: a label tensor or a dict ``{task: labels}``.
        mixed: the mix (sources and weights).
        num_classes: classes of each task with integer labels (an int for a bare tensor or for every task;
            a dict for several tasks).
    """
    if isinstance(targets, Mapping):
        out = {}
        for name, values in targets.items():
            classes = num_classes.get(name) if isinstance(num_classes, Mapping) else num_classes
            out[name] = _mix_one(name, values, mixed, classes)
        return out
    classes = num_classes if not isinstance(num_classes, Mapping) else next(iter(num_classes.values()), None)
    return _mix_one("labels", targets, mixed, classes)


def _mix_one(name: str, values: Tensor, mixed: MixedBatch, num_classes: int | None) -> Tensor:
    batch, k = mixed.sources.shape
    if values.shape[0] != batch:
        raise ValueError(f"labels of {name!r} have {values.shape[0]} rows for a batch of {batch}")
    if not values.is_floating_point():
        if values.ndim != 1:
            raise ValueError(f"integer labels of {name!r} must be class indices [B], got shape {tuple(values.shape)}")
        if num_classes is None:
            raise ValueError(f"task {name!r} has integer class labels: give its number of classes to mix them")
        missing = values < 0
        rows = F.one_hot(values.clamp_min(0), num_classes).float()
        rows[missing] = float("nan")
        values = rows
    gathered = values.float()[mixed.sources]  # [B, k, ...]
    weights = mixed.weights.to(gathered.dtype).view(batch, k, *([1] * (gathered.ndim - 2)))
    return (weights * gathered).sum(1)


class BatchMix:
    """Base of the batch mixes: ``mix(inputs) -> MixedBatch``; calling the object also mixes the labels.

    Subclasses implement :meth:`mix`. ``prob`` is the probability that a batch is mixed at all (else
    every sample is its own single source with weight 1). A batch of one sample has nothing to mix with
    and passes unmixed the same way (the last batch of an epoch without ``drop_last``).
    """

    num_sources: int = 2

    def __init__(self, prob: float = 1.0) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.prob = float(prob)

    def mix(self, inputs: Tensor) -> MixedBatch:
        raise NotImplementedError

    @staticmethod
    def _check_images(inputs: Tensor) -> None:
        if inputs.ndim != 4:
            raise ValueError(f"batch mixes need images [B, C, H, W], got shape {tuple(inputs.shape)}")

    @classmethod
    def _check(cls, inputs: Tensor) -> None:
        cls._check_images(inputs)
        if inputs.shape[0] < 2:
            raise ValueError("a batch needs at least 2 samples to be mixed")

    def __call__(
        self, inputs: Tensor, targets: Tensor | Mapping[str, Tensor], num_classes: int | Mapping[str, int | None] | None
    ) -> tuple[MixedBatch, Tensor | dict[str, Tensor]]:
        """Mix the images and the labels of every task alike (a single sample passes unmixed)."""
        self._check_images(inputs)
        # the batch alone decides: every mix pairs samples of this batch only (of this rank under DDP)
        if inputs.shape[0] < 2 or (self.prob < 1.0 and float(torch.rand(())) >= self.prob):
            index = torch.arange(inputs.shape[0], device=inputs.device)[:, None]
            mixed = MixedBatch(inputs, index, torch.ones(inputs.shape[0], 1, device=inputs.device))
        else:
            mixed = self.mix(inputs)
        return mixed, mix_targets(targets, mixed, num_classes)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
