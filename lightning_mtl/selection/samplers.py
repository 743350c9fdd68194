"""Multi-task sampling across heterogeneous data sets: proportional, temperature, round-robin, annealed.

Each task has its own data set (as in text multi-task learning); every batch holds samples of one
task and names it. The schedules follow the multi-task NLP literature: sampling proportional to the
data set sizes, temperature sampling ``p_t ∝ n_t ** alpha`` (Arivazhagan et al., 2019, "Massively
Multilingual Neural Machine Translation in the Wild", with ``alpha = 1 / T``), round-robin, and the
annealed schedule of Stickland & Murray (ICML 2019, "BERT and PALs"), whose exponent falls from 1
(proportional) towards uniform over the epochs.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl._resume import ResumableBatches  # moved to floor 0; importable from here as before

__all__ = [
    "MultiTaskBatchSampler",
    "MultiTaskSampling",
    "TaskBatch",
    "create_task_schedule",
    "largest_remainder",
    "list_task_schedules",
    "register_task_schedule",
]

# a schedule maps (task sizes in samples, epoch, number of epochs, alpha) to task probabilities
Schedule = Callable[[np.ndarray, int, int, float], np.ndarray]
_SCHEDULES: dict[str, Schedule] = {}


def register_task_schedule(name: str) -> Callable[[Schedule], Schedule]:
    """Function decorator: ``@register_task_schedule("mine")`` adds a task-probability schedule."""

    def wrap(fn: Schedule) -> Schedule:
        key = name.lower()
        if key in _SCHEDULES and _SCHEDULES[key] is not fn:
            raise ValueError(f"task schedule {name!r} is already registered")
        _SCHEDULES[key] = fn
        return fn

    return wrap


def list_task_schedules() -> list[str]:
    """Names of every registered task schedule, sorted."""
    return sorted(_SCHEDULES)


def create_task_schedule(name: str) -> Schedule:
    """The schedule registered as ``name`` (one clear error for an unknown one)."""
    try:
        return _SCHEDULES[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), list(_SCHEDULES), n=2, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"unknown task schedule {name!r}; {hint}known schedules: {', '.join(list_task_schedules())}"
        ) from None


def _power(sizes: np.ndarray, alpha: float) -> np.ndarray:
    weights = np.asarray(sizes, dtype=np.float64) ** float(alpha)
    return weights / weights.sum()


@register_task_schedule("proportional")
def proportional(sizes: np.ndarray, epoch: int, num_epochs: int, alpha: float) -> np.ndarray:
    """``p_t ∝ n_t``: every batch of every task once per epoch."""
    return _power(sizes, 1.0)


@register_task_schedule("temperature")
def temperature(sizes: np.ndarray, epoch: int, num_epochs: int, alpha: float) -> np.ndarray:
    """``p_t ∝ n_t ** alpha`` (``alpha = 1 / T``; 1 is proportional, 0 uniform)."""
    return _power(sizes, alpha)


@register_task_schedule("uniform")
def uniform(sizes: np.ndarray, epoch: int, num_epochs: int, alpha: float) -> np.ndarray:
    """``p_t = 1 / m`` whatever the sizes."""
    return _power(sizes, 0.0)


@register_task_schedule("annealed")
def annealed(sizes: np.ndarray, epoch: int, num_epochs: int, alpha: float) -> np.ndarray:
    """``p_t ∝ n_t ** a_e`` with ``a_e = 1 - (1 - alpha) * e / (E - 1)``: proportional in the first epoch,
    ``alpha`` in the last (Stickland & Murray anneal to 0.2; ``alpha=0`` ends uniform)."""
    progress = epoch / max(num_epochs - 1, 1)
    return _power(sizes, 1.0 - (1.0 - float(alpha)) * min(progress, 1.0))


@register_task_schedule("round_robin")
def round_robin(sizes: np.ndarray, epoch: int, num_epochs: int, alpha: float) -> np.ndarray:
    """Every batch of every task once per epoch, the tasks taking turns (the order is set by the sampler)."""
    return _power(sizes, 1.0)


def largest_remainder(weights: Sequence[float] | np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers proportional to ``weights`` that sum to ``total`` exactly (Hamilton's method).

    Ties in the remainders go to the lower index, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be a non-empty vector of finite non-negative numbers, got {w.tolist()}")
    if w.sum() == 0:
        w = np.ones_like(w)
    exact = w / w.sum() * int(total)
    counts = np.floor(exact).astype(np.int64)
    short = int(total) - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


class TaskBatch(NamedTuple):
    """A single-task batch: ``inputs``, ``targets`` (every task's labels, missing for the other tasks) and
    the ``task`` name. ``MultiTaskModule`` reads the first two like any ``(inputs, targets)`` batch."""

    inputs: Any
    targets: dict[str, Tensor]
    task: str


class EpochForward:
    """The ``sampler`` attribute of a batch sampler: Lightning calls ``set_epoch`` on a loader's
    ``sampler`` and ``batch_sampler.sampler`` (not on the batch sampler), so this forwards it."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class MultiTaskBatchSampler(Sampler[list[int]]):
    """Single-task batches of indices into the concatenation of several data sets, by a task schedule.

    The plan of an epoch depends only on ``(seed, epoch)`` (and the sizes): no hidden random state, so
    a resumed run sees the same batches. Each task streams through seeded permutations of its samples
    (pass ``k`` of task ``t`` is a permutation drawn from ``(seed, t, k)``) cut into global batches of
    ``batch_size * world_size`` samples; an epoch has as many steps as the tasks have batches, and the
    schedule decides how many of them each task gets (rounded by :func:`largest_remainder`, so the
    proportions are exact per epoch, not only on average) and in which order (shuffled, or taking
    turns for ``round_robin``). With ``proportional`` and ``round_robin`` every sample is seen once per
    epoch (DDP: see below); the other schedules draw more batches from some tasks (a task's stream then
    wraps into its next permutation) and fewer from others.

    DDP: every rank computes the same plan, so all ranks take the same task at each step (the gradient
    step is one task's, consistent across ranks), and rank ``r`` keeps the samples ``r::world_size`` of
    each global batch (disjoint shares). A task's last, partial, global batch is padded to a multiple of
    ``world_size`` with the first samples of the same permutation (as ``DistributedSampler`` pads), so
    under DDP a few samples may be seen twice per epoch; with one process nothing is padded.

    Args:
        sizes: number of samples of each task, in task order.
        batch_size: samples per batch on each rank.
        schedule: a registered schedule name (:func:`list_task_schedules`).
        alpha: the exponent of ``temperature`` (``p ∝ n ** alpha``) and the last exponent of ``annealed``.
        num_epochs: the epochs ``annealed`` spreads over (the Trainer's ``max_epochs``).
        drop_last: drop each task's last partial batch.
        seed: seed of the permutations and of the task order.
        rank: this process's rank; world_size: the number of processes.
        steps_per_epoch: steps of an epoch; by default the sum of the tasks' batch counts.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        batch_size: int,
        schedule: str = "proportional",
        alpha: float = 1.0,
        num_epochs: int = 1,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.sizes = np.asarray([int(n) for n in sizes], dtype=np.int64)
        if len(self.sizes) == 0 or (self.sizes <= 0).any():
            raise ValueError(f"every task needs at least one sample, got sizes {self.sizes.tolist()}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.schedule_name = schedule.lower()
        self.schedule = create_task_schedule(schedule)
        self.batch_size, self.alpha, self.num_epochs = int(batch_size), float(alpha), max(int(num_epochs), 1)
        self.drop_last, self.seed, self.rank, self.world_size = bool(drop_last), int(seed), int(rank), int(world_size)
        global_batch = self.batch_size * self.world_size
        rounding = np.floor if self.drop_last else np.ceil
        self.task_batches = rounding(self.sizes / global_batch).astype(np.int64)
        if (self.task_batches == 0).any():
            small = [i for i, b in enumerate(self.task_batches) if b == 0]
            raise ValueError(
                f"tasks {small} have fewer samples than one global batch ({global_batch}) and drop_last=True "
                "drops them all: lower batch_size or set drop_last=False"
            )
        self.steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else int(self.task_batches.sum())
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self.epoch = 0
        self.sampler = EpochForward(self)  # where Lightning looks for set_epoch
        self.resume: tuple[int, int] | None = None  # (epoch, batches of it to skip): a resumed run

    # --- plan -------------------------------------------------------------------------------------
    def counts(self, epoch: int) -> np.ndarray:
        """Batches of each task in ``epoch``: exact, summing to ``steps_per_epoch``."""
        if self.schedule_name in ("proportional", "round_robin") and self.steps_per_epoch == self.task_batches.sum():
            return self.task_batches.copy()  # every batch once, whatever the rounding of the probabilities
        probabilities = self.schedule(self.sizes, epoch, self.num_epochs, self.alpha)
        return largest_remainder(probabilities, self.steps_per_epoch)

    def task_order(self, epoch: int) -> np.ndarray:
        """The task of each step of ``epoch``."""
        counts = self.counts(epoch)
        if self.schedule_name == "round_robin":
            order, left = [], counts.copy()
            while left.any():  # one batch of each task that has some left, in task order
                turn = np.flatnonzero(left)
                order.extend(turn.tolist())
                left[turn] -= 1
            return np.asarray(order, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 1, epoch])
        return rng.permutation(np.repeat(np.arange(len(counts)), counts))

    def _stream_start(self, epoch: int) -> np.ndarray:
        """Batches each task's stream has given before ``epoch``."""
        if self.schedule_name in ("proportional", "round_robin") and self.steps_per_epoch == self.task_batches.sum():
            return self.task_batches * epoch
        return sum((self.counts(e) for e in range(epoch)), np.zeros(len(self.sizes), dtype=np.int64))

    def _permutation(self, task: int, passes: int) -> np.ndarray:
        """Pass ``passes`` of task ``task``'s stream (cached for the epoch being planned)."""
        key = (task, passes)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, 2, task, passes]).permutation(int(self.sizes[task]))
        return self._perms[key]

    def _global_batch(self, task: int, position: int) -> np.ndarray:
        """Local indices of batch ``position`` of task ``task``'s stream (all ranks)."""
        passes, within = divmod(int(position), int(self.task_batches[task]))
        size = self.batch_size * self.world_size
        perm = self._permutation(task, passes)
        chosen = perm[within * size : (within + 1) * size]
        if len(chosen) % self.world_size:  # the last partial batch under DDP: equal shares for all ranks
            pad = self.world_size - len(chosen) % self.world_size
            chosen = np.concatenate([chosen, np.resize(perm, pad)])
        return chosen

    def plan(self, epoch: int) -> Iterator[tuple[int, list[int]]]:
        """``(task, indices of this rank)`` for each step of ``epoch`` (indices into the concatenation)."""
        position = self._stream_start(epoch)
        self._perms = {}
        for task in self.task_order(epoch):
            chosen = self._global_batch(int(task), int(position[task]))[self.rank :: self.world_size]
            position[task] += 1
            yield int(task), (chosen + self.offsets[task]).tolist()
        self._perms = {}

    # --- Sampler ----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self.resume is not None and self.resume[0] == self.epoch:
            start = self.resume[1]
        self.resume = None
        for step, (_, indices) in enumerate(self.plan(self.epoch)):
            if step >= start:
                yield indices

    def skip(self, epoch: int, batches: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``batches`` batches (a resumed run); an
        iteration of another epoch starts at its beginning."""
        self.epoch, self.resume = int(epoch), (int(epoch), int(batches))


class _TaskItems(Dataset):
    """The samples of one task as ``(inputs, label)``: a data set item ``(x, y)``, or ``(x, {name: y})``
    (the label under the task's name, or the only one)."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style data sets have a length

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.unpack(self.dataset[index])

    def unpack(self, item: Any) -> tuple[Any, Tensor]:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(f"task {self.name!r}: items must be (inputs, labels), got {type(item).__name__}")
        inputs, label = item[0], item[1]
        if isinstance(label, Tensor):
            return inputs, label
        if isinstance(label, Mapping):
            if self.name in label:
                label = label[self.name]
            elif len(label) == 1:
                label = next(iter(label.values()))
            else:
                raise KeyError(f"task {self.name!r}: the items' labels have keys {list(label)}, none named so")
        return inputs, torch.as_tensor(label)


class _Concat(Dataset):
    """The tasks' items one after another; an item is ``(inputs, label, task index)``."""

    def __init__(self, parts: Sequence[_TaskItems]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self._starts = self.offsets[:-1].tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        task = bisect.bisect_right(self._starts, index) - 1
        inputs, label = self.parts[task][index - self._starts[task]]
        return inputs, label, task

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any, int]]:
        # the DataLoader fetches a whole batch at once: one task look-up for a single-task batch
        task = bisect.bisect_right(self._starts, indices[0]) - 1
        start, part = self._starts[task], self.parts[task]
        if max(indices) - start >= len(part) or min(indices) < start:
            return [self[i] for i in indices]  # several tasks: the collate explains
        data = part.dataset
        return [(*part.unpack(data[i - start]), task) for i in indices]


class _Collate:
    """Stacks a single-task batch into a :class:`TaskBatch`, the other tasks' labels marked missing
    (``MISSING_LABEL`` for class indices, ``NaN`` for float labels) so every task's loss sees its key."""

    def __init__(self, names: Sequence[str], templates: Sequence[Tensor]) -> None:
        self.names, self.templates = list(names), list(templates)

    def __call__(self, items: list[tuple[Any, Tensor, int]]) -> TaskBatch:
        tasks = {task for _, _, task in items}
        if len(tasks) != 1:
            raise ValueError(f"a batch must hold one task, got tasks {sorted(tasks)}")
        task = tasks.pop()
        inputs = torch.utils.data.default_collate([x for x, _, _ in items])
        targets = {}
        for i, (name, template) in enumerate(zip(self.names, self.templates)):
            if i == task:
                targets[name] = torch.stack([y for _, y, _ in items])
            else:
                fill = float("nan") if template.is_floating_point() else MISSING_LABEL
                targets[name] = torch.full((len(items), *template.shape), fill, dtype=template.dtype)
        return TaskBatch(inputs, targets, self.names[task])


class MultiTaskSampling(ResumableBatches, pl.LightningDataModule):
    """Several data sets, one per task, behind one data module that samples a task per batch.

    Give a data module (or a map-style data set: training data only) per task; the training loader
    yields single-task :class:`TaskBatch` es by a :class:`MultiTaskBatchSampler` schedule, the
    validation / test loaders every sample of every task once, task after task. A batch carries every
    task's key (the other tasks' labels missing), so :class:`~lightning_mtl.multitask.MultiTaskModule`
    trains on it as is: a task without labels in a batch has loss 0 there and no gradient. Its
    ``val/<task>/loss`` is the mean over all validation batches, those of the other tasks counting
    0: read the metrics (``val/<task>/acc``), which skip missing labels.

    Resume: the data module counts the training batches handed to the model
    (``on_before_batch_transfer``) and saves ``(epoch, batches)`` in its ``state_dict`` (Lightning
    puts it in checkpoints); a fit resumed from a mid-epoch checkpoint continues with the batches the
    uninterrupted run would have seen next.

    DDP: build the trainer with ``Trainer(use_distributed_sampler=False)``; the sampler shards each
    batch across ranks itself and all ranks train on the same task at each step.

    Args:
        tasks: task name -> ``LightningDataModule`` (its ``train_dataloader().dataset`` and, where it
            has them, the val / test loaders' data sets) or a ``Dataset`` of ``(inputs, label)`` items.
        batch_size: samples per batch (per rank under DDP).
        schedule: ``proportional``, ``temperature``, ``round_robin``, ``annealed`` or ``uniform``
            (:func:`list_task_schedules`).
        alpha: exponent of ``temperature`` (``p ∝ n ** alpha``, ``alpha = 1 / T``) and final exponent
            of ``annealed`` (0.2 in Stickland & Murray, 2019; 0 ends uniform).
        num_epochs: epochs of the ``annealed`` schedule; by default the Trainer's ``max_epochs``.
        steps_per_epoch: training steps per epoch; by default the total number of batches of the tasks.
        drop_last: drop each task's last partial batch.
        num_workers: DataLoader workers.
        seed: seed of the permutations and of the task order.
    """

    def __init__(
        self,
        tasks: dict[str, pl.LightningDataModule | Dataset],
        batch_size: int = 32,
        schedule: str = "proportional",
        alpha: float = 0.2,
        num_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskSampling needs at least one task in `tasks`")
        create_task_schedule(schedule)  # an unknown name fails here, not at the first epoch
        self.tasks = dict(tasks)
        self.batch_size, self.schedule, self.alpha = int(batch_size), schedule, float(alpha)
        self.num_epochs, self.steps_per_epoch, self.drop_last = num_epochs, steps_per_epoch, drop_last
        self.num_workers, self.seed = int(num_workers), int(seed)
        self._splits: dict[str, list[Dataset | None]] = {}
        self.sampler: MultiTaskBatchSampler | None = None
        self._epoch, self._consumed, self._resume = 0, 0, None  # ResumableBatches' bookkeeping

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    # --- building -----------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for source in self.tasks.values():
            if isinstance(source, pl.LightningDataModule):
                source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if connector is not None and connector.is_distributed and connector.use_distributed_sampler:
            raise RuntimeError(
                "MultiTaskSampling shards every batch across ranks itself: build the trainer with "
                "Trainer(use_distributed_sampler=False)."
            )
        if self._splits:
            return
        for name, source in self.tasks.items():
            if isinstance(source, pl.LightningDataModule):
                source.setup("fit")
                splits = [_loader_dataset(source, hook) for hook in ("train", "val", "test")]
                if splits[0] is None:
                    raise ValueError(f"task {name!r}: {type(source).__name__} has no train_dataloader()")
            elif isinstance(source, Dataset):
                splits = [source, None, None]
            else:
                raise TypeError(
                    f"task {name!r} must be a LightningDataModule or a Dataset, got {type(source).__name__}"
                )
            self._splits[name] = [None if s is None else _TaskItems(s, name) for s in splits]

    def _collate(self) -> _Collate:
        templates = []
        for name, (train, _, _) in self._splits.items():
            assert train is not None
            if len(train) == 0:  # type: ignore[arg-type]
                raise ValueError(f"task {name!r} has an empty training set")
            templates.append(train[0][1])
        return _Collate(list(self._splits), templates)

    # --- loaders ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        parts = [splits[0] for splits in self._splits.values()]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        epochs = self.num_epochs or (trainer.max_epochs if trainer is not None and trainer.max_epochs else 1)
        self.sampler = MultiTaskBatchSampler(
            [len(p) for p in parts],  # type: ignore[arg-type]
            self.batch_size, schedule=self.schedule, alpha=self.alpha, num_epochs=epochs, drop_last=self.drop_last,
            seed=self.seed, rank=rank, world_size=world, steps_per_epoch=self.steps_per_epoch,
        )  # fmt: skip
        self._resume_sampler(self.sampler)
        return DataLoader(
            _Concat(parts),  # type: ignore[arg-type]
            batch_sampler=self.sampler,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, split: int) -> DataLoader | list:
        self.setup("fit")
        parts = [splits[split] for splits in self._splits.values()]
        if any(p is None for p in parts):
            return []
        data = _Concat(parts)  # type: ignore[arg-type]
        # task-major order, cut at task boundaries so every batch holds one task
        batches = [
            list(range(lo + i, min(lo + i + self.batch_size, hi)))
            for lo, hi in zip(data.offsets[:-1].tolist(), data.offsets[1:].tolist())
            for i in range(0, hi - lo, self.batch_size)
        ]
        return DataLoader(data, batch_sampler=batches, collate_fn=self._collate(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(1)

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(2)


def _loader_dataset(datamodule: pl.LightningDataModule, split: str) -> Dataset | None:
    """The data set behind a data module's ``<split>_dataloader()``, or None where it has none."""
    try:
        loader = getattr(datamodule, f"{split}_dataloader")()
    except (NotImplementedError, AttributeError, MisconfigurationException):  # the hook's default raises
        return None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return getattr(loader, "dataset", None)
