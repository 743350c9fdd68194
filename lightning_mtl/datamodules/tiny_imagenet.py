"""Tiny-ImageNet-200 from its standard folder layout (``tiny-imagenet-200/``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from lightning_mtl.datamodules._images import ImageArrays, ImageClassificationDataModule, find_folder

__all__ = ["TinyImageNet"]

_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _decode_rgb(path: str) -> Tensor:
    # a few Tiny-ImageNet images are greyscale: decode everything to 3 channels
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class TinyImageNet(ImageClassificationDataModule):
    """Tiny-ImageNet (Le and Yang, "Tiny ImageNet Visual Recognition Challenge", Stanford CS231N, 2015):
    200 classes of 64x64 colour images, 500 training and 50 validation images per class.

    Reads the folder layout of the official archive (``root`` may also be that folder itself)::

        tiny-imagenet-200/wnids.txt                       200 class ids, one a line (defines label order)
        tiny-imagenet-200/train/<wnid>/images/*.JPEG
        tiny-imagenet-200/val/images/*.JPEG
        tiny-imagenet-200/val/val_annotations.txt         <file>\\t<wnid>\\t... one line per image

    The official test images have no public labels, so this module's **test split is the official
    validation split** (the protocol of the mixup papers); ``val_size`` holds out training images.
    Images are decoded lazily (greyscale ones to RGB). Default augmentation: random resized crop to
    64x64 and a horizontal flip (AutoMix's Tiny-ImageNet recipe).

    See :class:`~lightning_mtl.datamodules._images.ImageClassificationDataModule` for the arguments.
    """

    folder = "tiny-imagenet-200"
    num_classes = 200
    image_size = 64
    mean = (0.4802, 0.4481, 0.3975)
    std = (0.2770, 0.2691, 0.2821)
    expected_layout = (
        "  tiny-imagenet-200/wnids.txt\n  tiny-imagenet-200/train/<wnid>/images/*.JPEG\n"
        "  tiny-imagenet-200/val/images/*.JPEG and val/val_annotations.txt"
    )
    source = "http://cs231n.stanford.edu/tiny-imagenet-200.zip (unzip it into root)"

    def _augmentation(self) -> list[Any]:
        return [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip()]

    def _wnids(self, folder: str) -> list[str]:
        path = os.path.join(folder, "wnids.txt")
        with open(path) as handle:
            wnids = [line.strip() for line in handle if line.strip()]
        if len(wnids) != len(set(wnids)) or not wnids:
            raise self.layout_error(f"'{path}' must list distinct class ids, one a line")
        if len(wnids) != self.num_classes:
            raise self.layout_error(f"'{path}' lists {len(wnids)} classes, Tiny-ImageNet has {self.num_classes}")
        return wnids

    def _read(self, split: str) -> ImageArrays:
        folder = find_folder(self.root, self.folder, "wnids.txt")
        if folder is None:
            raise self.layout_error("no 'tiny-imagenet-200' folder (or its wnids.txt) found")
        wnids = self._wnids(folder)
        index = {wnid: i for i, wnid in enumerate(wnids)}
        paths: list[str] = []
        labels: list[int] = []
        if split == "train":
            for wnid in wnids:
                images = os.path.join(folder, "train", wnid, "images")
                if not os.path.isdir(images):
                    raise self.layout_error(f"folder '{images}' is missing")
                files = sorted(f for f in os.listdir(images) if f.lower().endswith(_EXTENSIONS))
                if not files:
                    raise self.layout_error(f"folder '{images}' holds no images")
                paths += [os.path.join(images, f) for f in files]
                labels += [index[wnid]] * len(files)
        else:
            annotations = os.path.join(folder, "val", "val_annotations.txt")
            if not os.path.isfile(annotations):
                raise self.layout_error(f"file '{annotations}' is missing")
            with open(annotations) as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    fields = line.split("\t")
                    if len(fields) < 2 or fields[1].strip() not in index:
                        raise self.layout_error(
                            f"line {number} of '{annotations}' does not name a known class: {line!r}"
                        )
                    path = os.path.join(folder, "val", "images", fields[0].strip())
                    if not os.path.isfile(path):
                        raise self.layout_error(f"image '{path}' listed in val_annotations.txt is missing")
                    paths.append(path)
                    labels.append(index[fields[1].strip()])
        return ImageArrays(paths, np.asarray(labels, dtype=np.int64), loader=_decode_rgb)
