"""MixBatch: apply a batch mix (Mixup, CutMix, ResizeMix, 3-sample mixup) to every training batch."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_mtl.mixup._base import BatchMix
from lightning_mtl.mixup.visualize import log_mixed_grid

__all__ = ["MixBatch", "hard_labels"]

# the attribute of a mixed label tensor that keeps the labels it replaced
_HARD_LABELS = "_mixbatch_hard_labels"


def hard_labels(targets: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
    """The labels a batch had before :class:`MixBatch` mixed them, e.g. for a training accuracy.

    Pass the labels as ``training_step`` receives them (a tensor or a dict ``{task: labels}``): each
    mixed tensor carries the one it replaced, unchanged (class indices stay class indices, missing labels
    stay negative). Integer labels that were never mixed are returned as they are, so the same step works
    without the callback. A float tensor without them (a copy or conversion of the mixed rows, or labels
    from elsewhere) is an error rather than a guess.

    In ``training_step``::

        x, y = batch
        logits = self.net(x)
        self.train_acc(logits, hard_labels(y))  # the loader's class indices
        return soft_target_cross_entropy(logits, y)  # the mixed rows
    """
    if isinstance(targets, Mapping):
        return {name: hard_labels(values) for name, values in targets.items()}  # type: ignore[misc]
    if not isinstance(targets, Tensor):
        raise TypeError(f"hard_labels takes a label tensor or a dict of them, got {type(targets).__name__}")
    hard = getattr(targets, _HARD_LABELS, None)
    if hard is not None:
        return hard
    if not targets.is_floating_point():
        return targets
    raise ValueError(
        f"these float labels of shape {tuple(targets.shape)} carry no hard labels: call hard_labels on the "
        "labels exactly as MixBatch put them in the batch (a copy, slice or conversion loses them)"
    )


class MixBatch(pl.Callback):
    """Mixes each training batch ``(inputs, labels)`` in place before ``training_step`` sees it.

    The labels of every task are mixed with the same sources and weights as the images
    (:func:`~lightning_mtl.mixup._base.mix_targets`): class labels become probability rows, which
    :class:`~lightning_mtl.multitask.tasks.ClassificationTask` trains on with the soft-target
    cross-entropy; float labels (multi-label, regression) are mixed linearly. With a
    :class:`~lightning_mtl.multitask.module.MultiTaskModule` the number of classes of each task comes from
    its tasks; otherwise give ``num_classes``.

    What ``training_step`` receives: the mixed images and, in place of each integer label tensor
    ``[B]``, float32 probability rows ``[B, num_classes]`` (a row with a missing label among its sources
    is ``NaN``) -- in every batch, also in one passed unmixed (``prob`` < 1, or a last batch of one
    sample), whose rows are one-hot. Train on them with
    :func:`~lightning_mtl.mixup.losses.soft_target_cross_entropy`. The labels the loader gave stay
    available through :func:`hard_labels` (``hard_labels(y)``): give those, not the rows, to an accuracy
    metric. torchmetrics' ``MulticlassAccuracy`` fed the rows fails on logits, but counts something else
    without a word on probabilities or with deterministic algorithms on.

    The batch is changed in place, after it reached the device: a list batch has its items replaced; a
    tuple batch needs a dict of labels (the images are overwritten in place and the dict updated).
    Validation and test batches are never mixed. Each batch is mixed within itself (under DDP within
    each rank's batch), so each rank decides from its own batch alone and no rank waits for another.

    Every ``log_every_n_steps`` optimizer steps a grid of the first mixed images with their weights goes
    to the W&B / TensorBoard loggers (``train/mixed``).

    Args:
        mix: the batch mix (``Mixup``, ``CutMix``, ``ResizeMix``, ``ThreeSampleMixup``, ...).
        num_classes: classes per task (int for all, or a dict); read from the module's tasks if not given.
        log_every_n_steps: period of the image grid; ``None`` or 0 logs none.
        max_images: images in the grid.
    """

    def __init__(
        self,
        mix: BatchMix,
        num_classes: int | dict[str, int] | None = None,
        log_every_n_steps: int | None = None,
        max_images: int = 16,
    ) -> None:
        if not isinstance(mix, BatchMix):
            raise TypeError(f"mix must be a BatchMix (e.g. Mixup, CutMix), got {type(mix).__name__}")
        self.mix = mix
        self.num_classes = num_classes
        self.log_every_n_steps = log_every_n_steps
        self.max_images = int(max_images)
        self._classes: int | Mapping[str, int | None] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.num_classes is not None:
            self._classes = self.num_classes
            return
        tasks = getattr(pl_module, "tasks", None)
        if isinstance(tasks, Mapping):
            self._classes = {name: getattr(task, "num_classes", None) for name, task in tasks.items()}
            return
        datamodule = getattr(trainer, "datamodule", None)
        self._classes = getattr(datamodule, "num_classes", None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[0], Tensor):
            raise TypeError("MixBatch needs batches (images, labels) with an image tensor first")
        inputs, targets = batch[0], batch[1]
        if isinstance(batch, tuple) and not isinstance(targets, MutableMapping):
            raise TypeError(
                "MixBatch changes the batch in place, and a tuple batch with a bare label tensor cannot be "
                "changed: yield a list (PyTorch's default collate does) or a dict of labels {task: labels}"
            )
        mixed, mixed_targets = self.mix(inputs, targets, self._classes)
        _keep_hard_labels(targets, mixed_targets)
        if isinstance(batch, list):
            batch[0] = mixed.inputs
            if isinstance(targets, MutableMapping):
                targets.update(mixed_targets)
            else:
                batch[1] = mixed_targets
        else:
            inputs.copy_(mixed.inputs)
            targets.update(mixed_targets)
        every = self.log_every_n_steps
        if every and trainer.global_step % every == 0 and batch_idx % trainer.accumulate_grad_batches == 0:
            log_mixed_grid(trainer, "train/mixed", mixed.inputs, mixed.weights, self.max_images)


def _keep_hard_labels(targets: Tensor | Mapping[str, Tensor], mixed: Tensor | Mapping[str, Tensor]) -> None:
    # read before the dict of labels is updated in place: the tensors it held are the hard labels
    if isinstance(mixed, Mapping):
        for name, values in mixed.items():
            setattr(values, _HARD_LABELS, targets[name])  # type: ignore[index]
    else:
        setattr(mixed, _HARD_LABELS, targets)
