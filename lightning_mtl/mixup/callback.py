"""MixBatch: apply a batch mix (Mixup, CutMix, ResizeMix, 3-sample mixup) to every training batch."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_mtl.mixup._base import BatchMix
from lightning_mtl.mixup.visualize import log_mixed_grid

__all__ = ["MixBatch"]


class MixBatch(pl.Callback):
    """Mixes each training batch ``(inputs, labels)`` in place before ``training_step`` sees it.

    The labels of every task are mixed with the same sources and weights as the images
    (:func:`~lightning_mtl.mixup._base.mix_targets`): class labels become probability rows, which
    :class:`~lightning_mtl.multitask.tasks.ClassificationTask` trains on with the soft-target
    cross-entropy; float labels (multi-label, regression) are mixed linearly. With a
    :class:`~lightning_mtl.multitask.module.MultiTaskModule` the number of classes of each task comes from
    its tasks; otherwise give ``num_classes``. A module of your own with a bare label tensor receives
    ``[B, num_classes]`` probability rows and should use
    :func:`~lightning_mtl.mixup.losses.soft_target_cross_entropy`.

    The batch is changed in place, after it reached the device: a list batch has its items replaced; a
    tuple batch needs a dict of labels (the images are overwritten in place and the dict updated).
    Validation and test batches are never mixed.

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
        self._classes: int | dict[str, int] | None = None

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
        if isinstance(batch, list):
            batch[0] = mixed.inputs
            if isinstance(targets, MutableMapping):
                targets.update(mixed_targets)  # type: ignore[arg-type]
            else:
                batch[1] = mixed_targets
        else:
            inputs.copy_(mixed.inputs)
            targets.update(mixed_targets)  # type: ignore[union-attr, arg-type]
        every = self.log_every_n_steps
        if every and trainer.global_step % every == 0 and batch_idx % trainer.accumulate_grad_batches == 0:
            log_mixed_grid(trainer, "train/mixed", mixed.inputs, mixed.weights, self.max_images)
