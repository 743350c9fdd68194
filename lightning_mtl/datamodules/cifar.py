"""CIFAR-10 and CIFAR-100 from the python-pickle layout that torchvision's datasets use."""

from __future__ import annotations

import os
import pickle

import numpy as np

from lightning_mtl.datamodules._images import ImageArrays, ImageClassificationDataModule, find_folder

__all__ = ["CIFAR10", "CIFAR100"]


class _CIFAR(ImageClassificationDataModule):
    folder: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_key: str = "labels"
    image_size = 32

    def _read(self, split: str) -> ImageArrays:
        folder = find_folder(self.root, self.folder, self.train_files[0])
        if folder is None:
            raise self.layout_error(f"no '{self.folder}' folder (or its files) found")
        images, labels = [], []
        for name in self.train_files if split == "train" else self.test_files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise self.layout_error(f"file '{path}' is missing")
            try:
                with open(path, "rb") as handle:
                    entry = pickle.load(handle, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8)
                label = np.asarray(entry[self.label_key], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
                problem = f"'{path}' is not a CIFAR python pickle ({type(error).__name__}: {error})"
                raise self.layout_error(problem) from None
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(label) != len(data):
                raise self.layout_error(
                    f"'{path}' holds data of shape {data.shape} with {len(label)} labels; expected [N, 3072] "
                    "uint8 and N labels"
                )
            if len(label) and (label.min() < 0 or label.max() >= self.num_classes):
                raise self.layout_error(f"'{path}' has labels outside 0..{self.num_classes - 1}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are channel-major planes
            labels.append(label)
        return ImageArrays(np.concatenate(images), np.concatenate(labels))


class CIFAR10(_CIFAR):
    """CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009): 50,000
    training and 10,000 test 32x32 colour images of 10 classes.

    Reads ``root/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (the layout of
    ``torchvision.datasets.CIFAR10``; ``root`` may also be that folder itself). Nothing is downloaded.
    Default training augmentation: random 32x32 crop of the 4-pixel zero-padded image and a horizontal
    flip; then scaling to [0, 1] and normalization with the training set's channel mean / std.

    See :class:`~lightning_mtl.datamodules._images.ImageClassificationDataModule` for the arguments.
    """

    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    expected_layout = "  cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch  (python pickles)"
    source = (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (unpack it into root), or run "
        "torchvision.datasets.CIFAR10(root, download=True) once"
    )


class CIFAR100(_CIFAR):
    """CIFAR-100 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009): 50,000
    training and 10,000 test 32x32 colour images of 100 (fine) classes.

    Reads ``root/cifar-100-python/{train, test}`` (the layout of ``torchvision.datasets.CIFAR100``;
    ``root`` may also be that folder itself) and uses the fine labels. Nothing is downloaded. Default
    augmentation as :class:`CIFAR10`, with CIFAR-100's channel statistics.

    See :class:`~lightning_mtl.datamodules._images.ImageClassificationDataModule` for the arguments.
    """

    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    expected_layout = "  cifar-100-python/train, test  (python pickles with 'data' and 'fine_labels')"
    source = (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (unpack it into root), or run "
        "torchvision.datasets.CIFAR100(root, download=True) once"
    )
