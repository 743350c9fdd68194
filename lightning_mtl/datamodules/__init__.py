"""Data modules: the embedded, offline digits (the default) and real data sets read from their standard
on-disk formats at a path the user gives (nothing downloads).

Multi-task modules yield batches ``(inputs, {task: labels})``; the single-task image modules yield
``(images, labels)`` (``as_dict=True`` for the multi-task form).
"""

from lightning_mtl.datamodules._common import EpochShuffleSampler, check_data_path
from lightning_mtl.datamodules._images import DataLayoutError, ImageClassificationDataModule
from lightning_mtl.datamodules.celeba import CelebA
from lightning_mtl.datamodules.cifar import CIFAR10, CIFAR100
from lightning_mtl.datamodules.cityscapes import Cityscapes
from lightning_mtl.datamodules.digits import Digits
from lightning_mtl.datamodules.digits_tasks import DigitsTasks
from lightning_mtl.datamodules.imagenet_r import ImageNetR
from lightning_mtl.datamodules.multidigits import MultiDigits
from lightning_mtl.datamodules.multimnist import MultiMNIST
from lightning_mtl.datamodules.npz import NpzMultiTaskDataModule
from lightning_mtl.datamodules.nyuv2 import NYUv2
from lightning_mtl.datamodules.spurious_digits import SpuriousDigits
from lightning_mtl.datamodules.stl10 import STL10
from lightning_mtl.datamodules.tabular import TabularMultiTask
from lightning_mtl.datamodules.text import TextMultiTask
from lightning_mtl.datamodules.tiny_imagenet import TinyImageNet

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "NYUv2",
    "STL10",
    "SpuriousDigits",
    "CelebA",
    "Cityscapes",
    "DataLayoutError",
    "Digits",
    "DigitsTasks",
    "EpochShuffleSampler",
    "ImageClassificationDataModule",
    "ImageNetR",
    "MultiDigits",
    "MultiMNIST",
    "NpzMultiTaskDataModule",
    "TabularMultiTask",
    "TextMultiTask",
    "TinyImageNet",
    "check_data_path",
]
