"""ImageNet-R from its official archive layout (``imagenet-r/<wnid>/*.jpg``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from lightning_mtl.datamodules._images import ImageArrays, ImageClassificationDataModule
from lightning_mtl.datamodules.tiny_imagenet import _decode_rgb

__all__ = ["ImageNetR"]

# what torchvision's ImageFolder reads, so that the file list (and hence the split) matches the official code
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageNetR(ImageClassificationDataModule):
    """ImageNet-R (Hendrycks et al., "The Many Faces of Robustness: A Critical Analysis of Out-of-Distribution
    Generalization", ICCV 2021): 30,000 renditions (art, cartoons, sketches, ...) of 200 ImageNet classes.

    Reads the folder layout of the official archive ``imagenet-r.tar`` (``root`` may also be the
    ``imagenet-r`` folder itself)::

        imagenet-r/<wnid>/*.jpg        200 class folders; labels follow the sorted folder names

    The archive has no train / test split. As in the continual-learning papers (L2P, DualPrompt, Si-Blurry /
    MVP), a seeded random 80 / 20 split of all images is used: the official Si-Blurry code permutes the
    ImageFolder file list (class folders and files sorted by name) with ``torch.randperm`` seeded by
    ``split_seed = 0`` and takes the first ``int(0.8 N)`` for training; this module does the same, so with
    the full archive it reproduces that split. ``val_size`` then holds out training images. Images are
    decoded lazily to RGB. Default transforms: ``Resize(256)``, ``RandomCrop(224)``, horizontal flip for
    training; ``Resize(256)``, ``CenterCrop(224)`` for evaluation (the official loader also crops test images
    at random; a centre crop keeps evaluation deterministic); normalized with the ImageNet statistics.

    Args:
        root: folder that holds ``imagenet-r/`` (or that folder itself).
        split_seed: seed of the 80 / 20 train / test split (official: 0).
        train_fraction: share of the images used for training.

    The other arguments (``batch_size``, ``val_size``, ``seed``, ``train_transform``, ``eval_transform``,
    ``as_dict`` ...) are those of :class:`~lightning_mtl.datamodules._images.ImageClassificationDataModule`.
    """

    folder = "imagenet-r"
    num_classes = 200
    image_size = 224
    resize = 256
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    expected_layout = "  imagenet-r/<wnid>/*.jpg   (200 class folders, e.g. imagenet-r/n01443537/art_0.jpg)"
    source = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (untar it into root)"

    def __init__(
        self,
        root: str,
        split_seed: int = 0,
        train_fraction: float = 0.8,
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
        if not 0.0 < float(train_fraction) < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self.split_seed = int(split_seed)
        self.train_fraction = float(train_fraction)
        self._files: tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None = None
        super().__init__(
            root, batch_size=batch_size, num_workers=num_workers, val_size=val_size, seed=seed,
            train_transform=train_transform, eval_transform=eval_transform, normalize=normalize,
            as_dict=as_dict, task_name=task_name, drop_last=drop_last, pin_memory=pin_memory,
        )  # fmt: skip

    def _augmentation(self) -> list[Any]:
        return [v2.Resize(self.resize, antialias=True), v2.RandomCrop(self.image_size), v2.RandomHorizontalFlip()]

    def default_eval_transform(self) -> Callable[[Any], Any]:
        return v2.Compose(
            [v2.ToImage(), v2.Resize(self.resize, antialias=True), v2.CenterCrop(self.image_size), *self._to_float()]
        )

    def _folder(self) -> str:
        for folder in (os.path.join(self.root, self.folder), self.root):
            if os.path.isdir(folder) and any(
                name.startswith("n") and os.path.isdir(os.path.join(folder, name)) for name in os.listdir(folder)
            ):
                return folder
        raise self.layout_error("no 'imagenet-r' folder with class folders found")

    def _listing(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        if self._files is not None:
            return self._files
        folder = self._folder()
        wnids = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
        if len(wnids) != self.num_classes:
            raise self.layout_error(f"'{folder}' holds {len(wnids)} class folders, ImageNet-R has {self.num_classes}")
        paths: list[str] = []
        labels: list[int] = []
        for label, wnid in enumerate(wnids):
            files = sorted(f for f in os.listdir(os.path.join(folder, wnid)) if f.lower().endswith(_EXTENSIONS))
            if not files:
                raise self.layout_error(f"class folder '{os.path.join(folder, wnid)}' holds no images")
            paths += [os.path.join(folder, wnid, f) for f in files]
            labels += [label] * len(files)
        generator = torch.Generator().manual_seed(self.split_seed)
        perm = torch.randperm(len(paths), generator=generator).numpy()
        num_train = int(len(paths) * self.train_fraction)
        train, test = np.sort(perm[:num_train]), np.sort(perm[num_train:])
        if len(train) == 0 or len(test) == 0:
            raise self.layout_error(f"only {len(paths)} images: too few for a train / test split")
        self._files = (paths, np.asarray(labels, dtype=np.int64), train, test)
        return self._files

    def _read(self, split: str) -> ImageArrays:
        paths, labels, train, test = self._listing()
        rows = train if split == "train" else test
        return ImageArrays([paths[i] for i in rows.tolist()], labels[rows], loader=_decode_rgb)
