"""CelebA: 40 binary face attributes, one task each, from the torchvision folder layout."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtl.datamodules._common import _TensorDataModule, check_data_path

__all__ = ["CelebA", "attribute_task_name"]

_DIGIT_WORDS = {"5": "five"}
_HINT = (
    "expected the torchvision layout celeba/img_align_celeba/*.jpg, celeba/list_attr_celeba.txt and "
    "celeba/list_eval_partition.txt under the root; get them from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or torchvision.datasets.CelebA(root, download=True))"
)


def attribute_task_name(attribute: str) -> str:
    """Task name of a CelebA attribute: lower case, a valid identifier (``5_o_Clock_Shadow`` ->
    ``five_o_clock_shadow``)."""
    name = attribute.strip().lower()
    if name[:1].isdigit():
        name = _DIGIT_WORDS.get(name[0], "n" + name[0]) + name[1:]
    return name


def read_attributes(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """``list_attr_celeba.txt`` -> (file names, attribute names, int8 array [N, 40] of -1 / 1)."""
    with open(path) as f:
        lines = f.read().splitlines()
    count = int(lines[0].split()[0])
    attributes = lines[1].split()
    files, values = [], []
    for line in lines[2 : 2 + count]:
        parts = line.split()
        if len(parts) != len(attributes) + 1:
            raise ValueError(f"{path}: line {line[:40]!r} has {len(parts) - 1} values for {len(attributes)} attributes")
        files.append(parts[0])
        values.append([int(v) for v in parts[1:]])
    if len(files) != count:
        raise ValueError(f"{path}: header announces {count} images, found {len(files)}")
    return files, attributes, np.asarray(values, dtype=np.int8)


class _CelebAImages(Dataset):
    def __init__(self, folder: str, files: list[str], labels: Tensor, names: list[str], size: int) -> None:
        self.folder, self.files, self.labels, self.names, self.size = folder, files, labels, names, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        from PIL import Image

        with Image.open(os.path.join(self.folder, self.files[index])) as image:
            image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)  # type: ignore[attr-defined]  # Pillow sets the flat constants at import, its stubs omit them
            array = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        row = self.labels[index]
        return x, {name: row[i] for i, name in enumerate(self.names)}


class CelebA(_TensorDataModule):
    """CelebA with its 40 binary attributes as 40 tasks (``BinaryTask``), images resized to a square.

    Liu, Luo, Wang and Tang, "Deep Learning Face Attributes in the Wild", ICCV 2015. Sener & Koltun (2018),
    Nash-MTL (Navon et al., ICML 2022) and F-MTL treat every attribute as a task; the standard partition
    (``list_eval_partition.txt``: 162,770 / 19,867 / 19,962 images) gives train / val / test.

    Expected layout (``root``; the torchvision layout)::

        root/celeba/img_align_celeba/000001.jpg ...
        root/celeba/list_attr_celeba.txt      line 1: count; line 2: 40 attribute names; then "file v1 .. v40"
        root/celeba/list_eval_partition.txt   "file 0|1|2" (train / val / test)

    Task names are the attribute names in lower case, ``5_o_Clock_Shadow`` becoming
    ``five_o_clock_shadow`` (see :func:`attribute_task_name`). Labels are ``long`` 0 / 1 (the files' -1
    becomes 0). Batches: ``(x [B, 3, S, S] in [0, 1], {task: long [B]})``.

    Args:
        root: the folder holding ``celeba/``.
        attributes: attribute names (as in the file, or task names) to keep; ``None`` keeps all 40.
        image_size: side of the resized square image (64 in Nash-MTL and F-MTL).
        batch_size: samples per batch.
        num_workers: DataLoader workers (JPEG decoding: use several for real runs).
        seed: seed of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        root: str,
        attributes: list[str] | None = None,
        image_size: int = 64,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.folder = os.path.join(self.root, "celeba")
        self.attributes = None if attributes is None else list(attributes)
        self.image_size = int(image_size)
        self._header: list[str] | None = None

    def _attribute_names(self) -> list[str]:
        if self._header is None:
            path = os.path.join(self.folder, "list_attr_celeba.txt")
            check_data_path(path, "CelebA", _HINT)
            with open(path) as f:
                f.readline()
                self._header = f.readline().split()
        return self._header

    def _selected(self) -> list[int]:
        header = self._attribute_names()
        if self.attributes is None:
            return list(range(len(header)))
        lookup = {a: i for i, a in enumerate(header)} | {attribute_task_name(a): i for i, a in enumerate(header)}
        unknown = [a for a in self.attributes if a not in lookup]
        if unknown:
            raise ValueError(f"CelebA has no attribute(s) {unknown}; it has: {', '.join(header)}")
        return [lookup[a] for a in self.attributes]

    @property
    def task_names(self) -> tuple[str, ...]:
        header = self._attribute_names()
        return tuple(attribute_task_name(header[i]) for i in self._selected())

    @property
    def num_classes(self) -> dict[str, int]:
        return {name: 2 for name in self.task_names}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _build(self) -> None:
        images = os.path.join(self.folder, "img_align_celeba")
        partition_path = os.path.join(self.folder, "list_eval_partition.txt")
        for path in (images, partition_path):
            check_data_path(path, "CelebA", _HINT)
        files, _, values = read_attributes(os.path.join(self.folder, "list_attr_celeba.txt"))
        with open(partition_path) as f:
            partition = dict(line.split()[:2] for line in f if line.strip())
        missing = [name for name in files if name not in partition]
        if missing:
            raise ValueError(f"{partition_path} has no split for {len(missing)} image(s), e.g. {missing[0]}")
        selected = self._selected()
        labels = torch.from_numpy((values[:, selected] > 0).astype(np.int64))
        names = list(self.task_names)
        splits = {}
        for split, code in (("train", "0"), ("val", "1"), ("test", "2")):
            rows = [i for i, name in enumerate(files) if partition[name] == code]
            splits[split] = _CelebAImages(images, [files[i] for i in rows], labels[rows], names, self.image_size)
        self.train_set, self.val_set, self.test_set = splits["train"], splits["val"], splits["test"]
