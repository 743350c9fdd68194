"""Shared base of the image-classification DataModules read from a user's disk (CIFAR, STL-10, Tiny-ImageNet).

A subclass only says where its files are and how to read them (:meth:`ImageClassificationDataModule._read`
returns uint8 arrays); this base holds out the validation images, applies the transforms and builds the
loaders. Images reach the transforms as ``torchvision.tv_tensors.Image`` (uint8, ``[C, H, W]``), which
every ``torchvision.transforms.v2`` transform accepts; the default transforms end with a float32 tensor
normalized with the data set's channel statistics.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lightning_mtl.datamodules._common import _DataLoaders

__all__ = ["DataLayoutError", "ImageArrays", "ImageClassificationDataModule", "ImageDataset"]


class DataLayoutError(FileNotFoundError):
    """The data set is missing at the given root or its files do not have the expected layout."""


class ImageArrays:
    """The images of one split and their labels (int64 ``[N]``, negative = unlabelled).

    ``images`` is a uint8 array ``[N, H, W, C]``, or any sequence whose items ``loader`` turns into a
    uint8 ``[C, H, W]`` tensor (file paths decoded lazily, rows of a memory-mapped file).
    """

    def __init__(self, images: Any, labels: np.ndarray, loader: Callable[[Any], Tensor] | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Tensor:
        """Image ``index`` as a uint8 ``[C, H, W]`` tensor."""
        if self.loader is not None:
            return self.loader(self.images[index])
        return torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Items ``(transform(image), label)`` of the rows ``indices`` of an :class:`ImageArrays`."""

    def __init__(self, arrays: ImageArrays, indices: np.ndarray | None, transform: Callable[[Any], Any] | None) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> Tensor:
        return torch.from_numpy(self.arrays.labels[self.indices])

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        row = int(self.indices[index])
        image = tv_tensors.Image(self.arrays.image(row))
        if self.transform is not None:
            image = self.transform(image)
        return image, torch.tensor(self.arrays.labels[row], dtype=torch.long)


class _DictTargets(Dataset):
    def __init__(self, inner: Dataset, task_name: str) -> None:
        self.inner, self.task_name = inner, task_name

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Tensor]]:
        image, label = self.inner[index]
        return image, {self.task_name: label}


class ImageClassificationDataModule(_DataLoaders, pl.LightningDataModule):
    """Base of the image-classification data modules read from ``root``.

    ``val_size`` images of the training split are held out for validation (a permutation seeded by
    ``seed``; they get the evaluation transform). With ``val_size=0`` the validation loader serves the
    **test split**, as in the mixup papers, whose published numbers are test accuracies tracked during
    training; hold out images (``val_size > 0``) for model selection that never sees the test split.

    Batches are ``(images, labels)`` with ``labels`` long ``[B]``, or ``(images, {task_name: labels})``
    when ``as_dict=True``. ``images`` is whatever the transform returns, collated (by default a float32
    ``[B, C, H, W]`` tensor; a two-view transform returning a tuple gives a tuple of such tensors).

    Args:
        root: folder that holds the data set in its standard layout (see the subclass).
        batch_size: samples per batch, all loaders.
        num_workers: DataLoader workers (``persistent_workers`` when > 0).
        val_size: number of training images held out for validation; 0 validates on the test split.
        seed: seed of the held-out split and of the training order (:class:`EpochShuffleSampler`, so a
            resumed run sees the same order as an uninterrupted one).
        train_transform: replaces the default training augmentation; called with a uint8
            ``tv_tensors.Image`` ``[C, H, W]``.
        eval_transform: replaces the default evaluation transform (validation, test, predict).
        normalize: end the default transforms with the data set's channel mean / std (else [0, 1]).
        as_dict: yield ``{task_name: labels}`` instead of a bare label tensor.
        task_name: name of the single task (``task_names``; the key when ``as_dict``).
        drop_last: drop the last incomplete training batch.
        pin_memory: forwarded to the DataLoaders.
    """

    name: str = "images"
    num_classes: int = 0
    image_size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 0,
        seed: int = 0,
        train_transform: Callable[[Any], Any] | None = None,
        eval_transform: Callable[[Any], Any] | None = None,
        normalize: bool = True,
        as_dict: bool = False,
        task_name: str = "label",
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self._init_loaders(batch_size, num_workers, seed, pin_memory)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0 (number of held-out training images), got {val_size}")
        for label, transform in (("train_transform", train_transform), ("eval_transform", eval_transform)):
            if transform is not None and not callable(transform):
                raise TypeError(f"{label} must be callable, got {type(transform).__name__}")
        self.root = os.fspath(root)
        self.val_size = int(val_size)
        self.normalize = bool(normalize)
        self.as_dict = bool(as_dict)
        self.task_name = str(task_name)
        self.drop_last = bool(drop_last)
        self.train_transform = train_transform if train_transform is not None else self.default_train_transform()
        self.eval_transform = eval_transform if eval_transform is not None else self.default_eval_transform()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.split_indices: dict[str, np.ndarray] = {}
        self.save_hyperparameters(ignore=["train_transform", "eval_transform"])

    # --- provided by subclasses -----------------------------------------------------------------
    def _read(self, split: str) -> ImageArrays:
        """The ``"train"`` or ``"test"`` split as :class:`ImageArrays`; raise :class:`DataLayoutError`."""
        raise NotImplementedError

    def _augmentation(self) -> list[Any]:
        """The random part of the default training transform (on uint8 images)."""
        return [v2.RandomCrop(self.image_size, padding=self.image_size // 8), v2.RandomHorizontalFlip()]

    # --- metadata -------------------------------------------------------------------------------
    @property
    def task_names(self) -> tuple[str, ...]:
        return (self.task_name,)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _to_float(self) -> list[Any]:
        steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        if self.normalize:
            steps.append(v2.Normalize(mean=list(self.mean), std=list(self.std)))
        return steps

    def default_train_transform(self) -> Callable[[Any], Any]:
        return v2.Compose([v2.ToImage(), *self._augmentation(), *self._to_float()])

    def default_eval_transform(self) -> Callable[[Any], Any]:
        return v2.Compose(self._to_float())

    def layout_error(self, problem: str) -> DataLayoutError:
        """A one-paragraph error: what is wrong, the expected layout and where to get the data."""
        return DataLayoutError(
            f"{type(self).__name__}: {problem}. Expected layout under root '{self.root}':\n{self.expected_layout}\n"
            f"Get the data from {self.source}"
        )

    expected_layout: str = ""
    source: str = ""

    # --- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, test = self._read("train"), self._read("test")
        labelled = np.flatnonzero(train.labels >= 0)  # STL-10's unlabelled images carry a negative label
        if self.val_size >= len(labelled):
            raise ValueError(
                f"val_size={self.val_size} leaves no training image: the train split has {len(labelled)} "
                "labelled images"
            )
        perm = np.random.default_rng(self.seed).permutation(labelled)
        val_rows = np.sort(perm[: self.val_size])
        train_rows = np.setdiff1d(np.arange(len(train)), val_rows)
        self.split_indices = {"train": train_rows, "val": val_rows}
        self.train_set = self._wrap(ImageDataset(train, train_rows, self.train_transform))
        self.test_set = self._wrap(ImageDataset(test, None, self.eval_transform))
        held_out = self._wrap(ImageDataset(train, val_rows, self.eval_transform))
        self.val_set = held_out if self.val_size else self.test_set

    def _wrap(self, dataset: Dataset) -> Dataset:
        return _DictTargets(dataset, self.task_name) if self.as_dict else dataset

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, batch_size={self.batch_size}, val_size={self.val_size})"


def find_folder(root: str, name: str, marker: str) -> str | None:
    """``root/name`` if it holds ``marker``, else ``root`` itself if it does (the user pointed at the
    data folder directly), else ``None``."""
    for folder in (os.path.join(root, name), root):
        if os.path.exists(os.path.join(folder, marker)):
            return folder
    return None
