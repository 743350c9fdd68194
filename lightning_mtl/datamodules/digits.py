"""The 8x8 handwritten digits shipped with scikit-learn, as a single-task DataModule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtl.datamodules._common import (
    TensorMultiTaskDataset,
    TensorSingleTaskDataset,
    _TensorDataModule,
    split_indices,
)

__all__ = ["Digits", "load_sklearn_digits", "digit_pools"]

DIGIT_SIZE = 8  # the sklearn digits are 8x8 images with integer grey levels 0..16


@lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as ``(images, labels)``: float32 ``[1797, 8, 8]`` in [0, 1], int64 ``[1797]``.

    ``sklearn.datasets.load_digits`` reads a file bundled with scikit-learn: nothing is downloaded.
    The arrays are cached and returned read-only.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _seed_streams(seed: int) -> list[np.random.Generator]:
    """Independent generators derived from ``seed``: [pool split, train, val, test]."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]


def digit_pools(seed: int, split_fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Seeded disjoint train / val / test split of the indices of the 1,797 sklearn digits.

    :class:`Digits` and :class:`~lightning_mtl.datamodules.MultiDigits` use the same split for the same
    ``seed`` and ``split_fractions``.
    """
    images, _ = load_sklearn_digits()
    return split_indices(len(images), split_fractions, _seed_streams(seed)[0])


class Digits(_TensorDataModule):
    """The plain 8x8 handwritten digits of scikit-learn (1,797 images, 10 classes) as one task.

    The source images are split, seeded by ``seed``, into disjoint train / val / test parts
    (``split_fractions``, default 70 / 15 / 15 %, i.e. 1,257 / 270 / 270 images). Grey levels are
    scaled to [0, 1], optionally upscaled to ``image_size`` (bilinear) and repeated to ``channels``,
    then, if ``normalize``, standardized with the mean and standard deviation of the training split
    (attributes :attr:`mean` and :attr:`std`, available after ``setup``).

    Batches are ``(x, {task_name: y})`` with ``x`` float32 ``[B, channels, image_size, image_size]``
    and ``y`` long, or ``(x, y)`` when ``as_dict=False``.

    With ``train_transform`` / ``eval_transform`` (e.g. the two-view augmentation of
    :class:`~lightning_mtl.ssl.TwoViews` for self-supervised learning), each training / evaluation item
    is ``transform(image)`` instead: the transform receives the float32 ``[channels, image_size,
    image_size]`` image in [0, 1] (before normalization) and the standardization, if ``normalize``, is
    applied to what it returns (to each view of a tuple or list). Without them the images are
    preprocessed once, as before.

    Note that the data set has no writer ids, so the same writer can appear in several splits.

    Args:
        task_name: name of the single task (the key of the target dict).
        image_size: side of the images fed to the model; 8 keeps them as they are, larger values
            upscale with bilinear interpolation (e.g. 16 or 32 for tiny ViTs).
        channels: 1 (grey) or 3 (grey repeated, for models that expect RGB).
        as_dict: if True batches are ``(x, {task_name: y})``, else ``(x, y)``.
        split_fractions: train / val / test shares of the 1,797 source images.
        normalize: standardize inputs with the training split's mean / std (else keep [0, 1]).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the split and of the training order.
        pin_memory: forwarded to the DataLoaders.
        train_transform: applied to every training image on each access (see above).
        eval_transform: applied to every validation / test image on each access.
    """

    def __init__(
        self,
        task_name: str = "digit",
        image_size: int = 8,
        channels: int = 1,
        as_dict: bool = True,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        normalize: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        train_transform: Callable[[Tensor], Any] | None = None,
        eval_transform: Callable[[Tensor], Any] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        for label, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            if transform is not None and not callable(transform):
                raise TypeError(f"{label} must be callable, got {type(transform).__name__}")
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.task_name = str(task_name)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.as_dict = bool(as_dict)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.normalize = bool(normalize)
        self.pools: dict[str, np.ndarray] = {}
        self.mean: float = 0.0
        self.std: float = 1.0
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])

    @property
    def task_names(self) -> tuple[str, ...]:
        return (self.task_name,)

    @property
    def num_classes(self) -> dict[str, int]:
        return {self.task_name: 10}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _build(self) -> None:
        images, labels = load_sklearn_digits()
        self.pools = digit_pools(self.seed, self.split_fractions)
        inputs = {}
        for split, idx in self.pools.items():
            x = torch.from_numpy(images[idx].copy()).unsqueeze(1)  # [N, 1, 8, 8]
            if self.image_size != DIGIT_SIZE and len(x):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
            inputs[split] = x
        if self.normalize:
            self.mean = float(inputs["train"].mean())
            self.std = float(inputs["train"].std())
        datasets: dict[str, Dataset] = {}
        for split, x in inputs.items():
            y = torch.from_numpy(labels[self.pools[split]].copy())
            transform = self.train_transform if split == "train" else self.eval_transform
            if transform is not None:
                raw = x.expand(-1, self.channels, -1, -1).contiguous().float()
                target = {self.task_name: y} if self.as_dict else y
                datasets[split] = _TransformedImages(raw, target, transform, self.mean, self.std)
                continue
            x = ((x - self.mean) / self.std).expand(-1, self.channels, -1, -1).contiguous().float()
            if self.as_dict:
                datasets[split] = TensorMultiTaskDataset(x, {self.task_name: y})
            else:
                datasets[split] = TensorSingleTaskDataset(x, y)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]


class _TransformedImages(Dataset):
    """Items ``(standardize(transform(images[i])), targets[i])``; ``targets`` a tensor or ``{task: tensor}``."""

    def __init__(
        self,
        images: Tensor,
        targets: Tensor | dict[str, Tensor],
        transform: Callable[[Tensor], Any],
        mean: float,
        std: float,
    ) -> None:
        self.images, self.targets, self.transform = images, targets, transform
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.images)

    def _standardize(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return ((value - self.mean) / self.std).float()
        if isinstance(value, (tuple, list)):
            return type(value)(self._standardize(v) for v in value)
        return value

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        target = (
            {name: values[index] for name, values in self.targets.items()}
            if isinstance(self.targets, dict)
            else self.targets[index]
        )
        return self._standardize(self.transform(self.images[index])), target
