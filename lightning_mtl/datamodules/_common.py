"""Pieces shared by the embedded data modules.

Batch contract of the whole library: a batch is ``(inputs, targets)`` with ``inputs`` a float32
tensor ``[B, C, H, W]`` and ``targets`` a ``dict[str, Tensor]`` mapping each task name to its labels
(``torch.long`` for class labels). PyTorch's default collate turns dataset items
``(x, {"left": y1, "right": y2})`` into exactly that, so no custom ``collate_fn`` is needed.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "EpochShuffleSampler",
    "TensorMultiTaskDataset",
    "TensorSingleTaskDataset",
    "check_data_path",
    "read_npy",
    "read_npz",
    "split_indices",
]


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of ``range(n)`` that depends only on ``seed + epoch``.

    Each call of :meth:`__iter__` draws the permutation from a fresh ``torch.Generator`` seeded with
    ``seed + epoch``, so the order of an epoch does not depend on what was drawn before it. Lightning
    calls :meth:`set_epoch` on the sampler at the start of every training epoch, hence a run resumed
    from a checkpoint at epoch ``k`` sees exactly the same order as an uninterrupted run. Outside
    Lightning, call ``set_epoch`` yourself; without it every epoch uses the order of epoch 0.

    Under DDP Lightning wraps this sampler in its ``DistributedSamplerWrapper``, which forwards
    ``set_epoch`` to it and gives each rank its share of this (rank-independent) permutation.

    Args:
        data_source: the dataset (anything with ``len``) or directly the number of samples.
        seed: base seed of the permutation.
        shuffle: if False, yields ``0, 1, ..., n - 1`` (handy to switch shuffling off from a config).
    """

    def __init__(self, data_source: Sized | int, seed: int = 0, shuffle: bool = True) -> None:
        n = int(data_source) if isinstance(data_source, (int, np.integer)) else len(data_source)
        if n < 0:
            raise ValueError(f"EpochShuffleSampler needs a non-negative number of samples, got {n}")
        self.num_samples = n
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def permutation(self) -> Tensor:
        """The indices of the current epoch as a long tensor."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={self.num_samples}, seed={self.seed}, epoch={self.epoch})"


def check_data_path(path: str | os.PathLike[str], dataset_name: str, hint: str) -> None:
    """Raise a one-sentence ``FileNotFoundError`` if ``path`` does not exist.

    Args:
        path: file or folder the dataset needs.
        dataset_name: human-readable name of the dataset, e.g. ``"NpzMultiTaskDataModule"``.
        hint: what the user should do, e.g. where to get the data or which format is expected.
    """
    if not os.path.exists(os.fspath(path)):
        hint = hint.strip().rstrip(".")
        raise FileNotFoundError(f"{dataset_name}: data not found at '{os.fspath(path)}'; {hint}.")


# what numpy raises for a file it cannot read as .npy / .npz without unpickling
_NUMPY_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def _unreadable(error: Exception) -> str:
    """Why numpy could not read a file, in words that never suggest loading it with unpickling."""
    text = str(error)
    if isinstance(error, zipfile.BadZipFile):
        return "it is not a complete zip archive (truncated, or another format)"
    if isinstance(error, EOFError):
        return "it is empty or truncated"
    if "Object arrays" in text:
        return "it holds Python objects (dtype object), which are never unpickled; save numeric arrays"
    if "pickle" in text:
        return "it is neither a .npz nor a .npy file (anything else would have to be unpickled, which is never done)"
    return f"{type(error).__name__}: {text}"


def read_npz(path: str, keys: Iterable[str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays ``keys`` (all when None) that the ``.npz`` file at ``path`` has, and all its keys.

    Nothing is unpickled (``allow_pickle=False``); a file numpy cannot read so (truncated, another format,
    object arrays) raises a ``ValueError`` naming it.
    """
    try:
        npz = np.load(path, allow_pickle=False)
    except _NUMPY_READ_ERRORS as error:
        raise ValueError(f"'{path}' is not a .npz file as numpy.savez writes it: {_unreadable(error)}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"'{path}' holds a single array (.npy), not named arrays as numpy.savez writes them")
    with npz:
        files = list(npz.files)
        arrays = {}
        for key in files if keys is None else [k for k in keys if k in files]:
            try:
                arrays[key] = npz[key]
            except _NUMPY_READ_ERRORS as error:
                raise ValueError(f"array '{key}' of '{path}' cannot be read: {_unreadable(error)}") from None
    return arrays, files


def read_npy(path: str) -> np.ndarray:
    """The array of the ``.npy`` file at ``path``, read without unpickling; a ``ValueError`` names a file that
    cannot be read so."""
    try:
        array = np.load(path, allow_pickle=False)
    except _NUMPY_READ_ERRORS as error:
        raise ValueError(f"'{path}' is not a .npy file as numpy.save writes it: {_unreadable(error)}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError(f"'{path}' is a .npz archive, not the single .npy array expected")
    return array


def split_indices(n: int, fractions: Sequence[float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded split of ``range(n)`` into disjoint, sorted ``train`` / ``val`` / ``test`` index arrays.

    ``fractions`` are the train / val / test shares; they must be non-negative and sum to 1 (up to
    rounding). The val and test sizes are rounded, the train split takes the rest.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    n_train = n - n_val - n_test
    if n_train <= 0 and fractions[0] > 0:
        raise ValueError(f"split fractions {fractions} leave no training sample out of {n}")
    perm = rng.permutation(n)
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


class TensorMultiTaskDataset(Dataset):
    """In-memory multi-task dataset: item ``i`` is ``(inputs[i], {task: targets[task][i]})``."""

    def __init__(self, inputs: Tensor, targets: Mapping[str, Tensor]) -> None:
        n = len(inputs)
        for name, values in targets.items():
            if len(values) != n:
                raise ValueError(f"target '{name}' has {len(values)} entries but inputs have {n}")
        self.inputs = inputs
        self.targets = dict(targets)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.inputs[index], {name: values[index] for name, values in self.targets.items()}


class TensorSingleTaskDataset(Dataset):
    """In-memory single-task dataset: item ``i`` is ``(inputs[i], targets[i])``."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"targets have {len(targets)} entries but inputs have {len(inputs)}")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


class _DataLoaders:
    """The loaders of a data module: the train split shuffled by :class:`EpochShuffleSampler` (seeded with
    ``seed``), val / test in order, predict on the test split. The class sets ``batch_size``,
    ``num_workers``, ``seed``, ``pin_memory`` (:meth:`_init_loaders`), ``train_set`` / ``val_set`` /
    ``test_set`` and ``setup``; ``drop_last`` drops the last incomplete training batch.
    """

    drop_last: bool = False
    # filled by the subclass (None until its setup has run)
    train_set: Dataset | None
    val_set: Dataset | None
    test_set: Dataset | None

    if TYPE_CHECKING:
        # declared for the checker only: the subclass provides setup, a method here would shadow it in the MRO
        def setup(self, stage: str | None = None) -> None: ...

    def _init_loaders(self, batch_size: int, num_workers: int, seed: int, pin_memory: bool) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the datasets were not built; call setup() first")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), seed=self.seed) if train else None,  # type: ignore[arg-type]
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, train=False)


class _TensorDataModule(_DataLoaders, pl.LightningDataModule):
    """Base of the in-memory data modules.

    Subclasses fill ``self.train_set``, ``self.val_set`` and ``self.test_set`` in :meth:`_build`
    (called once, from :meth:`setup`) and provide :attr:`task_names`, :attr:`num_classes` and
    :attr:`input_shape`, which are available right after construction (before ``setup``) so that
    models can be sized from them. The train loader shuffles with :class:`EpochShuffleSampler`;
    the val / test / predict loaders keep the order (predict uses the test split).

    Args:
        batch_size: samples per batch, all loaders.
        num_workers: DataLoader workers; ``persistent_workers`` is switched on when > 0.
        seed: seed of the data generation / split and of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self._init_loaders(batch_size, num_workers, seed, pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # --- to be provided by subclasses -----------------------------------------------------------
    @property
    def task_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def num_classes(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one input."""
        raise NotImplementedError

    def _build(self) -> None:
        raise NotImplementedError

    # --- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in dict(self.hparams).items())
        return f"{type(self).__name__}({args})"


class _LeftRightDigits(_TensorDataModule):
    """Base of the two-digit data modules: tasks ``left`` and ``right``, 10 classes each."""

    @property
    def task_names(self) -> tuple[str, ...]:
        return ("left", "right")

    @property
    def num_classes(self) -> dict[str, int]:
        return {"left": 10, "right": 10}
