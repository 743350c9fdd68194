"""Task specifications: what a task predicts, with which head, loss and metrics.

A task is a plain object (made from YAML by its class path) that knows how to build its head for a
given feature size, compute its loss on the samples that have a label, and build fresh torchmetrics
metrics. The :class:`~lightning_mtl.multitask.module.MultiTaskModule` owns the heads and metrics.

Missing labels: a sample whose label for a task is missing is left out of that task's loss and
metrics. The sentinels are

* integer labels: any negative value (PyTorch's ``ignore_index`` convention, ``-100`` by default);
* float labels: ``NaN``.

Multi-label and regression tasks mask element-wise, so one missing attribute of a sample does not
drop its other attributes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    MulticlassAccuracy,
    MultilabelAccuracy,
    MultilabelF1Score,
)

from lightning_mtl._constants import MISSING_LABEL  # public here too: the constant's historical home
from lightning_mtl._losses import soft_target_cross_entropy


class TaskError(ValueError):
    """A task's predictions or labels do not fit its specification."""


class Task:
    """Base class of task specifications.

    Args:
        head: the task-specific head; ``None`` builds a linear layer from the shared features to
            :attr:`out_features` outputs.
        weight: the task's weight under fixed linear scalarization (other aggregators ignore it).
    """

    out_features: int = 1

    def __init__(self, head: nn.Module | None = None, weight: float = 1.0) -> None:
        self.head = head
        self.weight = float(weight)

    # -- construction ---------------------------------------------------------------------------
    def build_head(self, in_features: int) -> nn.Module:
        return self.head if self.head is not None else nn.Linear(in_features, self.out_features)

    def build_metrics(self) -> dict[str, Metric]:
        raise NotImplementedError

    # -- per batch ------------------------------------------------------------------------------
    def valid_mask(self, target: Tensor) -> Tensor:
        """Boolean mask of labels that are present (same shape as ``target``)."""
        if target.is_floating_point():
            return ~torch.isnan(target)
        return target >= 0

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        """Validate shapes and return the target in the layout the loss expects."""
        raise NotImplementedError

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the present labels; zero (still attached to the graph) if none is present."""
        raise NotImplementedError

    def mask_out_of_range(self, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """For class-index labels: the checked ``target`` with labels ``>= num_classes`` marked missing (so the
        loss neither raises nor trips a device-side assert), and ``[count, lowest, highest]`` of those labels
        on the target's device, computed without a device sync. ``(target, None)`` for other tasks, and
        for labels on the host that are all in range (checked there at no sync cost)."""
        return target, None

    def _check_same_shape(self, name: str, pred: Tensor, target: Tensor, size_arg: str) -> Tensor:
        """For tasks with one target per output: ``[batch, out_features]`` predictions and targets (a
        flat ``[batch]`` target is accepted for one output)."""
        n = self.out_features
        if pred.ndim != 2 or pred.shape[1] != n:
            raise TaskError(
                f"task {name!r}: the head outputs shape {tuple(pred.shape)} but a {type(self).__name__} with "
                f"{size_arg}={n} needs [batch, {n}]; fix {size_arg} or the head"
            )
        if target.ndim == 1 and n == 1:
            target = target.unsqueeze(1)
        if target.shape != pred.shape:
            raise TaskError(
                f"task {name!r}: labels of shape {tuple(target.shape)} do not match predictions of shape "
                f"{tuple(pred.shape)} (one label per output)"
            )
        return target

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out_features={self.out_features}, weight={self.weight})"


def out_of_range(target: Tensor, num_classes: int, missing: int) -> tuple[Tensor, Tensor]:
    """``target`` with labels ``>= num_classes`` replaced by ``missing``, and ``[count, lowest, highest]`` of the
    replaced labels (count 0 when none) as a long tensor on the target's device: no host sync."""
    target = target.long()  # (a no-op for the usual long labels)
    if target.numel() == 0:
        return target, torch.zeros(3, dtype=torch.long, device=target.device)
    bad = target >= num_classes
    lowest = torch.where(bad, target, torch.iinfo(torch.long).max).min()
    highest = torch.where(bad, target, -1).max()
    return torch.where(bad, missing, target), torch.stack([bad.sum(), lowest, highest])


def _masked_mean(values: Tensor, mask: Tensor, anchor: Tensor) -> Tensor:
    # anchor * 0 keeps the result in the graph (and DDP's reducer happy) when nothing is labelled
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return torch.where(count > 0, total / count.clamp_min(1), anchor.sum() * 0.0)


class ClassificationTask(Task):
    """Multi-class classification: cross-entropy, accuracy.

    Labels are class indices ``[B]`` (negative = missing) or, for mixed samples (mixup and its kin),
    probability rows ``[B, num_classes]`` (a row with ``NaN`` = missing). Probability targets get the
    soft-target cross-entropy; the metrics then count the arg-max class of the mixture as the label.

    Args:
        num_classes: number of classes; the head must output this many logits.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        head: optional custom head (see :class:`Task`).
        weight: see :class:`Task`.
    """

    def __init__(
        self, num_classes: int, label_smoothing: float = 0.0, head: nn.Module | None = None, weight: float = 1.0
    ) -> None:
        super().__init__(head=head, weight=weight)
        if num_classes < 2:
            raise ValueError(f"ClassificationTask needs num_classes >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.out_features = self.num_classes
        self.label_smoothing = float(label_smoothing)

    def build_metrics(self) -> dict[str, Metric]:
        return {"acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=MISSING_LABEL)}

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        if pred.ndim != 2 or pred.shape[1] != self.num_classes:
            raise TaskError(
                f"task {name!r}: the head outputs shape {tuple(pred.shape)} but a ClassificationTask with "
                f"num_classes={self.num_classes} needs [batch, {self.num_classes}]; fix num_classes or the head"
            )
        if target.is_floating_point() and target.ndim == 2 and target.shape == pred.shape:
            return target  # probability rows of mixed samples
        if target.is_floating_point() or target.ndim != 1 or target.shape[0] != pred.shape[0]:
            raise TaskError(
                f"task {name!r}: labels must be integer class indices of shape [{pred.shape[0]}] (or probability "
                f"rows [{pred.shape[0]}, {self.num_classes}]), got "
                f"{str(target.dtype).replace('torch.', '')} of shape {tuple(target.shape)}"
            )
        return target

    def check_values(self, name: str, target: Tensor) -> None:
        """Eager range check of the labels (a device sync; the module checks every batch without one, see
        :meth:`mask_out_of_range`)."""
        if target.is_floating_point():
            return  # probability rows: their shape was checked by `check`
        valid = target[target >= 0]
        if valid.numel() and int(valid.max()) >= self.num_classes:
            raise TaskError(
                f"task {name!r}: label {int(valid.max())} is out of range for num_classes={self.num_classes} "
                f"(missing labels must be negative, e.g. {MISSING_LABEL})"
            )

    def mask_out_of_range(self, target: Tensor) -> tuple[Tensor, Tensor | None]:
        if target.is_floating_point():
            return target, None  # probability rows: their shape was checked by `check`
        if target.device.type == "cpu" and (target.numel() == 0 or int(target.max()) < self.num_classes):
            # on the host this test costs no device sync: a batch in range needs no mask and no deferred check
            return target.long(), None
        return out_of_range(target, self.num_classes, MISSING_LABEL)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if target.is_floating_point():  # probability rows of mixed samples
            return soft_target_cross_entropy(pred, target, self.label_smoothing)
        if target.device.type == "cpu" and not bool((target < 0).any()):
            # on the host this test costs no device sync: a batch without missing labels takes the plain mean
            return F.cross_entropy(pred.float(), target, label_smoothing=self.label_smoothing)
        labelled = target >= 0
        target = torch.where(labelled, target, MISSING_LABEL)
        loss = F.cross_entropy(pred.float(), target, ignore_index=MISSING_LABEL, label_smoothing=self.label_smoothing)
        # the built-in mean is 0/0 = NaN when a batch has no label for this task: 0 then (still in the
        # graph, with zero gradients) without a device sync, while a NaN from the logits still shows
        return torch.where(labelled.any(), loss, 0.0)

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        if target.is_floating_point():  # probability rows: the arg-max class of the mixture
            missing = torch.isnan(target).any(dim=1)
            target = torch.where(missing, MISSING_LABEL, torch.nan_to_num(target).argmax(dim=1))
        target = torch.where(target >= 0, target, MISSING_LABEL)
        for metric in metrics.values():
            metric.update(pred.detach(), target)


class MultiLabelTask(Task):
    """Binary or multi-label classification: binary cross-entropy with logits, accuracy and F1.

    Labels are 0/1 per label (int or float); missing ones are negative (int) or ``NaN`` (float).

    Args:
        num_labels: number of independent binary labels; the head outputs one logit per label.
        pos_weight: optional positive-class weight per label (see ``BCEWithLogitsLoss``).
        threshold: decision threshold on the sigmoid for the metrics.
    """

    def __init__(
        self,
        num_labels: int = 1,
        pos_weight: list[float] | None = None,
        threshold: float = 0.5,
        head: nn.Module | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(head=head, weight=weight)
        self.num_labels = int(num_labels)
        self.out_features = self.num_labels
        self.pos_weight = None if pos_weight is None else [float(p) for p in pos_weight]
        self.threshold = float(threshold)

    def build_metrics(self) -> dict[str, Metric]:
        kwargs: dict[str, Any] = dict(threshold=self.threshold, ignore_index=MISSING_LABEL)
        if self.num_labels == 1:  # torchmetrics' multilabel metrics need at least two labels
            return {"acc": BinaryAccuracy(**kwargs), "f1": BinaryF1Score(**kwargs)}
        kwargs["num_labels"] = self.num_labels
        return {
            "acc": MultilabelAccuracy(average="micro", **kwargs),
            "f1": MultilabelF1Score(average="macro", **kwargs),
        }

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        return self._check_same_shape(name, pred, target, "num_labels")

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        mask = self.valid_mask(target)
        target = torch.where(mask, target, torch.zeros_like(target)).to(pred.dtype).float()
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=pred.device)
        per_elem = F.binary_cross_entropy_with_logits(pred.float(), target, pos_weight=pos_weight, reduction="none")
        return _masked_mean(per_elem, mask, pred)

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        mask = self.valid_mask(target)
        target = torch.where(mask, target, torch.zeros_like(target)).long()
        target = torch.where(mask, target, torch.full_like(target, MISSING_LABEL))
        # probabilities, not logits: torchmetrics would take logits that happen to lie in [0, 1] for them
        probs = torch.sigmoid(pred.detach().float())
        if self.num_labels == 1:
            probs, target = probs.reshape(-1), target.reshape(-1)
        for metric in metrics.values():
            metric.update(probs, target)


class BinaryTask(MultiLabelTask):
    """A single binary label (shape ``[batch]`` or ``[batch, 1]``): :class:`MultiLabelTask` with one label."""

    def __init__(
        self,
        pos_weight: float | None = None,
        threshold: float = 0.5,
        head: nn.Module | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(
            num_labels=1,
            pos_weight=None if pos_weight is None else [pos_weight],
            threshold=threshold,
            head=head,
            weight=weight,
        )


class RegressionTask(Task):
    """Regression: mean squared (or absolute / smooth-L1) error; metrics MAE and MSE.

    Args:
        out_features: number of regressed values per sample.
        loss: ``"mse"``, ``"l1"`` or ``"smooth_l1"``.
    """

    _losses = {"mse": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}

    def __init__(
        self,
        out_features: int = 1,
        loss: Literal["mse", "l1", "smooth_l1"] = "mse",
        head: nn.Module | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(head=head, weight=weight)
        if loss not in self._losses:
            raise ValueError(f"RegressionTask loss must be one of {sorted(self._losses)}, got {loss!r}")
        self.out_features = int(out_features)
        self.loss_name = loss

    def build_metrics(self) -> dict[str, Metric]:
        return {"mae": MeanAbsoluteError(), "mse": MeanSquaredError()}

    def check(self, name: str, pred: Tensor, target: Tensor) -> Tensor:
        target = self._check_same_shape(name, pred, target, "out_features")
        if not target.is_floating_point():
            target = target.float()
        return target

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        mask = self.valid_mask(target)
        target = torch.where(mask, target, torch.zeros_like(target))
        per_elem = self._losses[self.loss_name](pred.float(), target.float(), reduction="none")
        return _masked_mean(per_elem, mask, pred)

    def update_metrics(self, metrics: dict[str, Metric], pred: Tensor, target: Tensor) -> None:
        mask = self.valid_mask(target)
        for metric in metrics.values():
            metric.update(pred.detach().float()[mask], target.float()[mask])
