"""Shared reader of the preprocessed ``.npy`` scene-understanding layout used by MTAN and LibMTL.

One folder per split, one sub-folder per modality, one file ``<i>.npy`` per sample (``i`` = 0, 1, ...)::

    <root>/train/image/0.npy   float, [H, W, 3], RGB in [0, 1]
    <root>/train/<label>/0.npy float, [H, W], class index, -1 = void
    <root>/train/depth/0.npy   float, [H, W, 1], 0 = no reading
    <root>/train/normal/0.npy  float, [H, W, 3], unit normals (NYUv2 only)
    <root>/val/...

Samples become ``(image [3, H, W], {task: label})`` with segmentation ``long [H, W]``, depth
``float [1, H, W]`` and normals ``float [3, H, W]``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtl.datamodules._common import _TensorDataModule, check_data_path, read_npy

KIND_SEGMENTATION, KIND_DEPTH, KIND_NORMAL = "segmentation", "depth", "normal"


def count_samples(folder: str) -> int:
    """Number of consecutive files ``0.npy, 1.npy, ...`` in ``folder`` (a gap is an error)."""
    names = [n for n in os.listdir(folder) if n.endswith(".npy")]
    indices = sorted(int(n[:-4]) for n in names if n[:-4].isdigit())
    if indices != list(range(len(indices))):
        raise ValueError(f"{folder}: expected files 0.npy .. {len(indices) - 1}.npy without gaps")
    return len(indices)


class DenseNpyDataset(Dataset):
    """Reads sample ``i`` of one split; optional MTAN-style augmentation (random scale-crop, flip).

    Args:
        folder: the split folder (``<root>/train``).
        tasks: task name -> (sub-folder, kind), kind one of segmentation / depth / normal.
        augment: random scale-crop with a scale from ``scales`` (the crop is resized back to the full size;
            depth is divided by the scale, since zooming in brings the scene closer) and a horizontal flip
            with probability 0.5 (which mirrors the x component of the normals).
        scales: zoom factors of the scale-crop.
        size: optional ``(H, W)`` to resize every sample to (images bilinear, labels nearest).
    """

    def __init__(
        self,
        folder: str,
        tasks: Mapping[str, tuple[str, str]],
        augment: bool = False,
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        size: tuple[int, int] | None = None,
    ) -> None:
        self.folder = folder
        self.tasks = dict(tasks)
        self.augment = augment
        self.scales = tuple(float(s) for s in scales)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.length = count_samples(os.path.join(folder, "image"))
        for sub, _ in self.tasks.values():
            n = count_samples(os.path.join(folder, sub))
            if n != self.length:
                raise ValueError(f"{folder}: {n} files in {sub}/ but {self.length} in image/")

    def __len__(self) -> int:
        return self.length

    def _load(self, sub: str, index: int) -> Tensor:
        return torch.from_numpy(read_npy(os.path.join(self.folder, sub, f"{index}.npy")).astype(np.float32))

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image = self._load("image", index).permute(2, 0, 1)
        maps: dict[str, Tensor] = {}
        for name, (sub, _kind) in self.tasks.items():
            value = self._load(sub, index)
            maps[name] = value[None] if value.ndim == 2 else value.permute(2, 0, 1)  # -> [C, H, W]
        if self.size is not None and tuple(image.shape[-2:]) != self.size:
            image, maps = self._resize(image, maps, self.size)
        if self.augment:
            image, maps = self._augment(image, maps)
        targets = {}
        for name, (_, kind) in self.tasks.items():
            value = maps[name]
            targets[name] = value[0].round().long() if kind == KIND_SEGMENTATION else value.contiguous()
        return image.contiguous(), targets

    def _resize(
        self, image: Tensor, maps: dict[str, Tensor], size: tuple[int, int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        # labels, depth and normals: nearest, so no invalid (0 / void) pixel is blended into a valid one
        return image, {k: F.interpolate(v[None], size=size, mode="nearest")[0] for k, v in maps.items()}

    def _augment(self, image: Tensor, maps: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        height, width = image.shape[-2:]
        scale = random.choice(self.scales)
        if scale != 1.0:
            h, w = int(height / scale), int(width / scale)
            top, left = random.randint(0, height - h), random.randint(0, width - w)
            image = image[:, top : top + h, left : left + w]
            maps = {k: v[:, top : top + h, left : left + w] for k, v in maps.items()}
            image, maps = self._resize(image, maps, (height, width))
            for name, (_, kind) in self.tasks.items():
                if kind == KIND_DEPTH:
                    maps[name] = maps[name] / scale
        if random.random() < 0.5:
            image = image.flip(-1)
            maps = {k: v.flip(-1) for k, v in maps.items()}
            for name, (_, kind) in self.tasks.items():
                if kind == KIND_NORMAL:
                    maps[name] = maps[name] * torch.tensor([-1.0, 1.0, 1.0])[:, None, None]
        return image, maps


class DenseNpyDataModule(_TensorDataModule):
    """Base of the NYUv2 and Cityscapes data modules (see their docstrings)."""

    dataset_name = "dense data set"
    hint = ""
    default_shape: tuple[int, int] = (0, 0)

    def __init__(
        self,
        root: str,
        tasks: Mapping[str, tuple[str, str]],
        classes: int,
        augment: bool,
        image_size: tuple[int, int] | None,
        batch_size: int,
        num_workers: int,
        seed: int,
        pin_memory: bool,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.root = os.fspath(root)
        self._tasks = dict(tasks)
        self._classes = int(classes)
        self.augment = bool(augment)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        """Output channels per task: classes for segmentation, 1 for depth, 3 for normals."""
        sizes = {KIND_SEGMENTATION: self._classes, KIND_DEPTH: 1, KIND_NORMAL: 3}
        return {name: sizes[kind] for name, (_, kind) in self._tasks.items()}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, *(self.image_size or self.default_shape))

    def _build(self) -> None:
        layout = ", ".join(f"{sub}/" for sub, _ in self._tasks.values())
        hint = (
            f"expected the preprocessed .npy layout <root>/train/ and <root>/val/, each with image/, {layout} "
            f"holding 0.npy, 1.npy, ...; {self.hint}"
        )
        for split in ("train", "val"):
            check_data_path(os.path.join(self.root, split, "image"), self.dataset_name, hint)
            for sub, _ in self._tasks.values():
                check_data_path(os.path.join(self.root, split, sub), self.dataset_name, hint)
        self.train_set = DenseNpyDataset(
            os.path.join(self.root, "train"), self._tasks, self.augment, size=self.image_size
        )
        # the published protocol (MTAN, LibMTL, Nash-MTL) has no separate test split: val serves as test
        self.val_set = DenseNpyDataset(os.path.join(self.root, "val"), self._tasks, False, size=self.image_size)
        self.test_set = self.val_set
