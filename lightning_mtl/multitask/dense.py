"""Dense-prediction tasks: semantic segmentation, depth and surface normals (per-pixel outputs).

Predictions are ``[B, C, h, w]`` maps. When a head predicts at a lower resolution than the labels
(a dilated ResNet at 1/8), the loss and the metrics first resize the prediction bilinearly to the
label size, as LibMTL does for its DeepLab heads.

Missing or invalid pixels:

* segmentation: any negative label (``-1`` marks void in the MTAN / LibMTL NYUv2 and Cityscapes files);
* depth: ``0`` (no sensor reading) or ``NaN``;
* normals: an all-zero normal vector or ``NaN``.

Metrics accumulate over the whole evaluation set, pixel by pixel (MTAN averages per-batch values
instead, so its numbers can differ slightly on the last, smaller batch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanAbsolutePercentageError, MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from lightning_mtl.multitask.tasks import Task, TaskError, out_of_range

__all__ = ["AngleMedian", "DepthTask", "SegmentationTask", "SurfaceNormalTask", "angle_errors", "conv_head"]

_IGNORE = -1  # void label handed to torchmetrics (every negative label is mapped to it)


def conv_head(in_channels: int, out_channels: int, hidden: int | None = None) -> nn.Module:
    """The default dense head: a 3x3 conv with ReLU, then a 1x1 conv to ``out_channels`` (MTAN's task heads
    are of this shape)."""
    hidden = hidden or in_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1)
    )


class _DenseTask(Task):
    """Shared checks of the dense tasks: ``[B, C, h, w]`` predictions against ``[B, (C,) H, W]`` labels."""

    target_channels: int = 1  # channels of the label map (0: a map without channel axis)

    def build_head(self, in_features: int) -> nn.Module:
        return self.head if self.head is not None else conv_head(in_features, self.out_features)

    def _check_dense(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        if pred.ndim != 4 or pred.shape[1] != self.out_features:
            raise TaskError(
                f"task {name!r}: the head outputs shape {tuple(pred.shape)} but a {type(self).__name__} needs "
                f"[batch, {self.out_features}, height, width]; the encoder must keep a spatial map "
                "(a SegNet / dilated ResNet, not a pooled vector)"
            )
        if self.target_channels == 0:
            expected = "[batch, height, width]"
            ok = target.ndim == 3 or (target.ndim == 4 and target.shape[1] == 1)
            if target.ndim == 4 and ok:
                target = target[:, 0]
        else:
            expected = f"[batch, {self.target_channels}, height, width]"
            if target.ndim == 3 and self.target_channels == 1:
                target = target.unsqueeze(1)
            ok = target.ndim == 4 and target.shape[1] == self.target_channels
        if not ok or target.shape[0] != pred.shape[0]:
            raise TaskError(f"task {name!r}: labels must be {expected}, got shape {tuple(target.shape)}")
        return target

    @staticmethod
    def _resize(pred: Tensor, target: Tensor) -> Tensor:
        size = target.shape[-2:]
        if pred.shape[-2:] == size:
            return pred
        return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


class SegmentationTask(_DenseTask):
    """Semantic segmentation: per-pixel cross-entropy; mean IoU and pixel accuracy.

    Metrics: ``miou`` (torchmetrics' ``MulticlassJaccardIndex``, macro average over the classes from the
    confusion matrix accumulated over the whole set) and ``pixel_acc`` (``MulticlassAccuracy``, micro);
    void pixels (negative labels) count in neither.

    Args:
        num_classes: number of classes (13 for NYUv2, 7 or 19 for Cityscapes).
        head: optional custom head; by default :func:`conv_head` from the shared features.
        weight: see :class:`~lightning_mtl.multitask.tasks.Task`.
    """

    target_channels = 0

    def __init__(self, num_classes: int, head: nn.Module | None = None, weight: float = 1.0) -> None:
        super().__init__(head=head, weight=weight)
        if num_classes < 2:
            raise ValueError(f"SegmentationTask needs num_classes >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.out_features = self.num_classes
        self._values_checked = False

    def build_metrics(self) -> dict[str, Metric]:
        return {
            "miou": MulticlassJaccardIndex(self.num_classes, average="macro", ignore_index=_IGNORE),
            "pixel_acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=_IGNORE),
        }

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        target = self._check_dense(name, pred, target)
        if target.is_floating_point():
            # the preprocessed .npy files store labels as floats (-1 = void); NaN also means void
            target = torch.nan_to_num(target, nan=_IGNORE).round().long()
        if not self._values_checked:  # a device sync, so only on the first batch
            self._values_checked = True
            if target.numel() and int(target.max()) >= self.num_classes:
                raise TaskError(
                    f"task {name!r}: label {int(target.max())} is out of range for num_classes={self.num_classes} "
                    "(void pixels must be negative, e.g. -1)"
                )
        return target

    def mask_out_of_range(self, target: Tensor) -> tuple[Tensor, Tensor | None]:
        return out_of_range(target, self.num_classes, _IGNORE)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = self._resize(pred, target).float()
        target = torch.where(target >= 0, target, _IGNORE)
        # sum over labelled pixels / their count: 0 in the graph (not NaN) for an all-void batch
        total = F.cross_entropy(pred, target, ignore_index=_IGNORE, reduction="sum")
        return total / (target != _IGNORE).sum().clamp_min(1)

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        labels = self._resize(pred.detach(), target).argmax(1)
        target = torch.where(target >= 0, target, _IGNORE)
        for metric in metrics.values():
            metric.update(labels, target)


class DepthTask(_DenseTask):
    """Depth estimation: L1 loss over the valid pixels (MTAN / LibMTL); absolute and relative error.

    Metrics (pixels with depth 0 or NaN are left out): ``abs_err`` = mean ``|d - d*|`` and ``rel_err`` =
    mean ``|d - d*| / d*`` (torchmetrics' ``MeanAbsoluteError`` and ``MeanAbsolutePercentageError``, a
    fraction, not a percentage, as in the published tables).

    Args:
        head: optional custom head; by default :func:`conv_head` with one output channel.
        weight: see :class:`~lightning_mtl.multitask.tasks.Task`.
    """

    target_channels = 1

    def __init__(self, head: nn.Module | None = None, weight: float = 1.0) -> None:
        super().__init__(head=head, weight=weight)
        self.out_features = 1

    def build_metrics(self) -> dict[str, Metric]:
        return {"abs_err": MeanAbsoluteError(), "rel_err": MeanAbsolutePercentageError()}

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        return self._check_dense(name, pred, target).float()

    @staticmethod
    def valid_pixels(target: Tensor) -> Tensor:
        return (target != 0) & ~torch.isnan(target)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = self._resize(pred, target).float()
        mask = self.valid_pixels(target)
        errors = (pred - torch.nan_to_num(target)).abs()
        count = mask.sum()
        total = torch.where(mask, errors, torch.zeros_like(errors)).sum()
        return torch.where(count > 0, total / count.clamp_min(1), pred.sum() * 0.0)

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        pred = self._resize(pred.detach(), target).float()
        mask = self.valid_pixels(target)
        for metric in metrics.values():
            metric.update(pred[mask], target[mask])


def angle_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Angle in degrees between predicted and true normals, ``[B, 3, H, W] -> [B, H, W]`` (the prediction
    is normalized first; the target is taken as given)."""
    cos = (F.normalize(pred.float(), dim=1) * target.float()).sum(1)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


class AngleMedian(Metric):
    """Median of angle errors in degrees over a whole set, from a fine histogram.

    Keeping every pixel's error (LibMTL does) costs 4 bytes a pixel: 290 MB for the NYUv2 validation
    set. A histogram over ``[0, 180]`` with ``bins`` bins costs a few kB, syncs across DDP ranks as a sum
    and locates the median to within one bin (0.01 degree by default); inside that bin the errors are
    taken as uniform.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    hist: Tensor  # a metric state, added in __init__ (declared here for the type checker)

    def __init__(self, bins: int = 18000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bins = int(bins)
        self.add_state("hist", torch.zeros(self.bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, errors: Tensor) -> None:
        index = (errors.detach().double().flatten() * (self.bins / 180.0)).long().clamp(0, self.bins - 1)
        self.hist += torch.bincount(index, minlength=self.bins).to(self.hist)

    def compute(self) -> Tensor:
        total = self.hist.sum()
        if total == 0:
            return torch.tensor(float("nan"))
        cum = torch.cumsum(self.hist, 0)
        half = total / 2
        k = int(torch.searchsorted(cum, half))
        width = 180.0 / self.bins
        if cum[k] == half and k + 1 < self.bins:
            # an even split at the end of bin k: the middle of the two neighbouring bins (as np.median
            # averages the two middle values)
            k_next = k + 1 + int(torch.nonzero(self.hist[k + 1 :])[0])
            return ((k + k_next + 1) / 2 * width * torch.ones(())).float()
        before = cum[k] - self.hist[k]
        return ((k + (half - before) / self.hist[k]) * width).float()


class _PercentWithin(MeanMetric):
    """Share (in %) of errors below a threshold."""

    higher_is_better = True  # type: ignore[assignment]  # torchmetrics' aggregators type the flag as None

    def __init__(self, threshold: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def update(self, errors: Tensor) -> None:  # type: ignore[override]
        super().update((errors < self.threshold).float() * 100.0)


class _MeanAngle(MeanMetric):
    higher_is_better = False  # type: ignore[assignment]  # torchmetrics' aggregators type the flag as None


class SurfaceNormalTask(_DenseTask):
    """Surface-normal estimation: ``1 - cos`` loss between unit normals; angle-error metrics.

    The head's three channels are normalized to unit length before the loss and the metrics. Pixels
    whose true normal is all zero (or NaN) are left out. Metrics: ``mean_angle`` and ``median_angle``
    (degrees, lower is better) and ``within_11_25`` / ``within_22_5`` / ``within_30`` (% of pixels
    within that many degrees, higher is better), as reported by MTAN, LibMTL and Nash-MTL.

    Args:
        head: optional custom head; by default :func:`conv_head` with three output channels.
        weight: see :class:`~lightning_mtl.multitask.tasks.Task`.
    """

    target_channels = 3
    thresholds = {"within_11_25": 11.25, "within_22_5": 22.5, "within_30": 30.0}

    def __init__(self, head: nn.Module | None = None, weight: float = 1.0) -> None:
        super().__init__(head=head, weight=weight)
        self.out_features = 3

    def build_metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {"mean_angle": _MeanAngle(), "median_angle": AngleMedian()}
        metrics.update({name: _PercentWithin(t) for name, t in self.thresholds.items()})
        return metrics

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        return self._check_dense(name, pred, target).float()

    @staticmethod
    def valid_pixels(target: Tensor) -> Tensor:
        return (target != 0).any(1) & ~torch.isnan(target).any(1)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred = F.normalize(self._resize(pred, target).float(), dim=1)
        mask = self.valid_pixels(target)
        cos = (pred * torch.nan_to_num(target)).sum(1)
        count = mask.sum()
        total = torch.where(mask, 1.0 - cos, torch.zeros_like(cos)).sum()
        return torch.where(count > 0, total / count.clamp_min(1), pred.sum() * 0.0)

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        pred = self._resize(pred.detach(), target)
        mask = self.valid_pixels(target)
        errors = angle_errors(pred, target)[mask]
        for metric in metrics.values():
            metric.update(errors)
