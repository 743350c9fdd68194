"""Embedded, offline data modules.

All of them yield batches ``(inputs, targets)``: ``inputs`` a float32 tensor ``[B, C, H, W]`` and
``targets`` a ``dict[str, Tensor]`` from task name to labels (long for class labels).
"""

from lightning_mtl.datamodules._common import EpochShuffleSampler, check_data_path
from lightning_mtl.datamodules.digits import Digits
from lightning_mtl.datamodules.multidigits import MultiDigits
from lightning_mtl.datamodules.npz import NpzMultiTaskDataModule

__all__ = ["Digits", "EpochShuffleSampler", "MultiDigits", "NpzMultiTaskDataModule", "check_data_path"]
