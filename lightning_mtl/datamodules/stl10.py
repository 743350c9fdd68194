"""STL-10 from the binary layout that torchvision's dataset uses (``stl10_binary/*.bin``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from lightning_mtl.datamodules._images import ImageArrays, ImageClassificationDataModule, find_folder

__all__ = ["STL10"]

_SIDE = 96
_PIXELS = 3 * _SIDE * _SIDE
UNLABELLED = -1
"""Label of the unlabelled images (torchvision's convention; any negative label is "missing" here)."""


def _column_major_to_chw(row: np.ndarray) -> Tensor:
    # each image is stored as three 96x96 planes written column by column
    return torch.from_numpy(np.ascontiguousarray(np.asarray(row).transpose(0, 2, 1)))


class _Rows:
    """Rows of several memory-mapped image files, indexed as one sequence."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.ends, index, side="right"))
        start = int(self.ends[part - 1]) if part else 0
        return self.parts[part][index - start]


class STL10(ImageClassificationDataModule):
    """STL-10 (Coates, Ng and Lee, "An Analysis of Single-Layer Networks in Unsupervised Feature
    Learning", AISTATS 2011): 5,000 labelled training and 8,000 test 96x96 colour images of 10 classes,
    plus 100,000 unlabelled images.

    Reads ``root/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin}`` and, with
    ``unlabeled=True``, ``unlabeled_X.bin`` (the layout of ``torchvision.datasets.STL10``; ``root`` may
    also be that folder itself). The image files are memory-mapped, not read into memory. Labels in the
    files are 1..10 and become 0..9; with ``unlabeled=True`` the unlabelled images join the training
    split with label ``-1`` (a missing label for the library's tasks; they are never held out for
    validation). Default augmentation: random 96x96 crop of the 12-pixel padded image and a flip.

    Args:
        unlabeled: add the 100,000 unlabelled images to the training split (self-supervised training).

    The other arguments are those of :class:`~lightning_mtl.datamodules._images.ImageClassificationDataModule`.
    """

    folder = "stl10_binary"
    num_classes = 10
    image_size = _SIDE
    mean = (0.4467, 0.4398, 0.4066)
    std = (0.2603, 0.2566, 0.2713)
    expected_layout = (
        "  stl10_binary/train_X.bin, train_y.bin, test_X.bin, test_y.bin  (uint8 binaries; "
        "unlabeled_X.bin for unlabeled=True)"
    )
    source = (
        "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz (unpack it into root), or run "
        "torchvision.datasets.STL10(root, download=True) once"
    )

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
        unlabeled: bool = False,
    ) -> None:
        self.unlabeled = bool(unlabeled)
        super().__init__(
            root, batch_size=batch_size, num_workers=num_workers, val_size=val_size, seed=seed,
            train_transform=train_transform, eval_transform=eval_transform, normalize=normalize, as_dict=as_dict,
            task_name=task_name, drop_last=drop_last, pin_memory=pin_memory,
        )  # fmt: skip

    def _augmentation(self) -> list[Any]:
        return [v2.RandomCrop(_SIDE, padding=12), v2.RandomHorizontalFlip()]

    def _images(self, folder: str, name: str) -> np.ndarray:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise self.layout_error(f"file '{path}' is missing")
        size = os.path.getsize(path)
        if size == 0 or size % _PIXELS:
            raise self.layout_error(f"'{path}' has {size} bytes, not a whole number of 3x96x96 uint8 images")
        return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, _SIDE, _SIDE)

    def _labels(self, folder: str, name: str, count: int) -> np.ndarray:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise self.layout_error(f"file '{path}' is missing")
        labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
        if len(labels) != count:
            raise self.layout_error(f"'{path}' has {len(labels)} labels for {count} images")
        if len(labels) and (labels.min() < 1 or labels.max() > 10):
            raise self.layout_error(f"'{path}' has labels outside 1..10")
        return labels - 1

    def _read(self, split: str) -> ImageArrays:
        folder = find_folder(self.root, self.folder, "train_X.bin")
        if folder is None:
            raise self.layout_error("no 'stl10_binary' folder (or its train_X.bin) found")
        images = self._images(folder, f"{split}_X.bin")
        labels = self._labels(folder, f"{split}_y.bin", len(images))
        parts = [images]
        if split == "train" and self.unlabeled:
            extra = self._images(folder, "unlabeled_X.bin")
            parts.append(extra)
            labels = np.concatenate([labels, np.full(len(extra), UNLABELLED, dtype=np.int64)])
        return ImageArrays(_Rows(parts), labels, loader=_column_major_to_chw)
