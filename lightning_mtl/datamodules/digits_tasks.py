"""DigitsTasks: tasks derived from the embedded sklearn digits, for fine-tuning experts and merging them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl.datamodules._common import EpochShuffleSampler, TensorMultiTaskDataset, _TensorDataModule
from lightning_mtl.datamodules.digits import digit_pools, load_sklearn_digits

__all__ = ["DIGITS_TASKS", "DigitsTasks", "TaskGroups", "concat_groups"]


def _identity(x: Tensor, perm: Tensor) -> Tensor:
    return x


def _rotate90(x: Tensor, perm: Tensor) -> Tensor:
    return torch.rot90(x, 1, dims=(-2, -1))


def _invert(x: Tensor, perm: Tensor) -> Tensor:
    return 1.0 - x


def _permute(x: Tensor, perm: Tensor) -> Tensor:
    flat = x.flatten(-2)
    return flat[..., perm].reshape(x.shape)


def _hflip(x: Tensor, perm: Tensor) -> Tensor:
    return torch.flip(x, dims=(-1,))


def _vflip(x: Tensor, perm: Tensor) -> Tensor:
    return torch.flip(x, dims=(-2,))


# name -> (input map on [N, 1, 8, 8] images in [0, 1], label map on digit labels, number of classes)
DIGITS_TASKS: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor], int]] = {
    "identity": (_identity, lambda y: y, 10),
    "rotate90": (_rotate90, lambda y: y, 10),
    "invert": (_invert, lambda y: y, 10),
    "permute": (_permute, lambda y: y, 10),
    "parity": (_identity, lambda y: y % 2, 2),
    "mod3": (_identity, lambda y: y % 3, 3),
    "hflip": (_hflip, lambda y: y, 10),
    "vflip": (_vflip, lambda y: y, 10),
}


class TaskGroups(Dataset):
    """Item ``g`` is one sample of every task: the group ``(x [T, ...], {task: y [T]})``.

    Task ``t`` contributes its sample ``perms[t][g]``, a fixed random permutation of its own (seeded), so
    the tasks' samples in a group are unrelated. A loader of groups (:func:`concat_groups` as collate)
    gives task-balanced batches on every rank, also under DDP, where each rank draws whole groups.

    Args:
        dataset: the concatenation of the tasks' datasets (items ``(x, {task: y})``).
        sizes: number of samples of each task, in the order of the concatenation; the smallest sets the
            number of groups (the smallest task drives the epoch).
        seed: seed of the permutations.
    """

    def __init__(self, dataset: Dataset, sizes: Sequence[int], seed: int = 0) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every task needs at least one sample, got sizes {list(sizes)}")
        self.dataset = dataset
        generator = torch.Generator().manual_seed(int(seed))
        offsets = np.cumsum([0, *sizes[:-1]]).tolist()
        self.perms = [torch.randperm(int(n), generator=generator)[: min(sizes)] + off for n, off in zip(sizes, offsets)]

    def __len__(self) -> int:
        return len(self.perms[0])

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        items = [self.dataset[int(perm[index])] for perm in self.perms]
        x = torch.stack([item[0] for item in items])
        return x, {name: torch.stack([item[1][name] for item in items]) for name in items[0][1]}


def concat_groups(groups: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Collate :class:`TaskGroups` items into one flat batch ``(x [G * T, ...], {task: y [G * T]})``."""
    x = torch.cat([g[0] for g in groups])
    return x, {name: torch.cat([g[1][name] for g in groups]) for name in groups[0][1]}


class DigitsTasks(_TensorDataModule):
    """Tasks derived from the 8x8 sklearn digits: the same kind of input, a different mapping per task.

    A small, offline benchmark for model merging (task vectors, aTLAS, grafting): pre-train an encoder on
    ``identity`` (the plain digits), fine-tune one expert per derived task, merge the experts. Tasks
    (:data:`DIGITS_TASKS`): ``identity``; ``rotate90`` (image rotated 90 degrees counter-clockwise);
    ``invert`` (grey levels ``1 - x``); ``permute`` (a fixed pixel permutation drawn from
    ``permutation_seed``); ``hflip`` / ``vflip`` (mirrored image); ``parity`` (label ``y mod 2``,
    2 classes) and ``mod3`` (label ``y mod 3``, 3 classes) on the plain image. All tasks use the same
    seeded train / val / test split of the 1,797 source images as :class:`~lightning_mtl.datamodules.Digits`
    (1,257 / 270 / 270 by default), so an image never crosses splits between tasks. Inputs are
    standardized with the mean / std of the plain training images (the same affine map for every task,
    so ``invert`` is a true shift of the input distribution).

    One task (``tasks="rotate90"``): batches ``(x, {"rotate90": y})``, shuffled per epoch; fine-tune an
    expert with :class:`~lightning_mtl.multitask.MultiTaskModule` and one task of that name.
    Several tasks: every split holds every task's copy of its images; a sample's labels are
    ``{task: y}`` with :data:`~lightning_mtl.MISSING_LABEL` for every task but its own (so the task id
    of a sample is the one label that is present, and ``MultiTaskModule`` trains on it as is). The
    training loader is task-balanced (:class:`TaskGroups`, the aTLAS recipe's fixed share per task): each
    batch holds ``batch_size // T`` samples of each task, the epoch has ``train images // (batch_size // T)``
    batches, shuffled per epoch. Under DDP every rank's batch is balanced (ranks draw whole groups).

    ``train_split="val"`` makes the training loader draw from the validation images instead (same
    balancing and shuffling): the aTLAS recipe learns its merge coefficients on the validation splits, as the
    official code does, not on the data the experts were fine-tuned on. The validation loader is unchanged,
    so its metrics then measure the fit, not held-out data; the test split stays untouched.

    Args:
        tasks: a task name or a list of them (from :data:`DIGITS_TASKS`).
        permutation_seed: seed of the ``permute`` task's pixel permutation (independent of ``seed``).
        split_fractions: train / val / test shares of the 1,797 source images.
        normalize: standardize the inputs (else keep [0, 1]).
        batch_size: samples per batch (with several tasks: a multiple of the number of tasks is best;
            the training batches hold ``batch_size // T`` samples per task).
        num_workers: DataLoader workers.
        seed: seed of the split and of the training order.
        pin_memory: forwarded to the DataLoaders.
        train_split: the split the training loader draws from: ``"train"`` or ``"val"``.
    """

    def __init__(
        self,
        tasks: str | Sequence[str] = "identity",
        permutation_seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        normalize: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        train_split: str = "train",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if train_split not in ("train", "val"):
            raise ValueError(f"train_split must be 'train' or 'val', got {train_split!r}")
        self.train_split = train_split
        names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
        if not names:
            raise ValueError("DigitsTasks needs at least one task")
        unknown = [n for n in names if n not in DIGITS_TASKS]
        if unknown:
            raise ValueError(f"unknown DigitsTasks task {unknown[0]!r}; known: {', '.join(DIGITS_TASKS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"DigitsTasks tasks must be distinct, got {list(names)}")
        if len(names) > 1 and batch_size < len(names):
            raise ValueError(f"batch_size={batch_size} is smaller than the {len(names)} tasks of a balanced batch")
        self.tasks = names
        self.permutation_seed = int(permutation_seed)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.normalize = bool(normalize)
        self.mean: float = 0.0
        self.std: float = 1.0
        self.save_hyperparameters()

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.tasks

    @property
    def num_classes(self) -> dict[str, int]:
        return {name: DIGITS_TASKS[name][2] for name in self.tasks}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def pixel_permutation(self) -> Tensor:
        """The fixed pixel permutation of the ``permute`` task (64 indices)."""
        generator = torch.Generator()
        generator.manual_seed(self.permutation_seed)
        return torch.randperm(64, generator=generator)

    def _build(self) -> None:
        images, labels = load_sklearn_digits()
        pools = digit_pools(self.seed, self.split_fractions)
        perm = self.pixel_permutation()
        if self.normalize:
            train = torch.from_numpy(images[pools["train"]].copy())
            self.mean, self.std = float(train.mean()), float(train.std())
        datasets: dict[str, Dataset] = {}
        self.task_sizes: dict[str, list[int]] = {}
        for split, idx in pools.items():
            x0 = torch.from_numpy(images[idx].copy()).unsqueeze(1)
            y0 = torch.from_numpy(labels[idx].copy())
            xs: list[Tensor] = []
            ys: dict[str, list[Tensor]] = {name: [] for name in self.tasks}
            for name in self.tasks:
                input_map, label_map, _ = DIGITS_TASKS[name]
                xs.append(((input_map(x0, perm) - self.mean) / self.std).float().contiguous())
                for other in self.tasks:
                    y = label_map(y0) if other == name else torch.full_like(y0, MISSING_LABEL)
                    ys[other].append(y)
            datasets[split] = TensorMultiTaskDataset(torch.cat(xs), {n: torch.cat(v) for n, v in ys.items()})
            self.task_sizes[split] = [len(idx)] * len(self.tasks)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = self.train_set if self.train_split == "train" else self.val_set
        if len(self.tasks) == 1:
            return self._loader(dataset, train=True)
        groups = TaskGroups(dataset, self.task_sizes[self.train_split], seed=self.seed)  # type: ignore[arg-type]  # built by setup above
        return DataLoader(
            groups,
            batch_size=self.batch_size // len(self.tasks),
            sampler=EpochShuffleSampler(len(groups), seed=self.seed),
            collate_fn=concat_groups,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
