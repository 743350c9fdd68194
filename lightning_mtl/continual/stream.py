"""The Si-Blurry online continual-learning stream as a Lightning data module.

* :func:`si_blurry_split`: the pure split of a training set into tasks (disjoint and blurry classes,
  stochastic task boundaries).
* :class:`SiBlurryStream`: wraps any image data module and serves the stream as ONE Lightning epoch of
  :class:`StreamBatch` items, with online repetitions (or offline epochs per task), reservoir replay,
  exposure-ordered labels, mid-stream resume and a per-rank share of every step under DDP.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_mtl._distributed import distributed_rank, distributed_world_size

__all__ = ["SiBlurrySplit", "SiBlurryStream", "StreamBatch", "StreamStep", "si_blurry_split"]


# --------------------------------------------------------------------------------------------------
# the split
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiBlurrySplit:
    """Result of :func:`si_blurry_split`.

    Attributes:
        tasks: per task, the (shuffled) int64 indices of its training samples.
        disjoint_classes: per task, the disjoint classes whose home is that task (original labels).
        blurry_classes: per task, the blurry classes whose home is that task.
        blurred: indices of the blurry-class samples that were pooled and dealt across tasks (a dealt
            sample may land back in its home task).
    """

    tasks: list[np.ndarray]
    disjoint_classes: list[np.ndarray]
    blurry_classes: list[np.ndarray]
    blurred: np.ndarray


def _floor_share(count: int, ratio: float) -> int:
    # floor(count * ratio) without 0.29 * 100 = 28.999... surprises
    return int(math.floor(count * ratio + 1e-9))


def _chunks(group: np.ndarray, num_tasks: int, stochastic: bool, rng: np.random.Generator) -> list[np.ndarray]:
    if not stochastic:
        return [np.asarray(part) for part in np.array_split(group, num_tasks)]
    # T - 1 cut points drawn in [0, n) as in the official sampler: chunks vary in size, can be empty
    cuts = np.sort(rng.integers(0, len(group), num_tasks - 1)) if len(group) else np.zeros(num_tasks - 1, np.int64)
    bounds = [0, *cuts.tolist(), len(group)]
    return [group[bounds[t] : bounds[t + 1]] for t in range(num_tasks)]


def si_blurry_split(
    labels: np.ndarray | Sequence[int] | Tensor,
    num_tasks: int = 5,
    disjoint_class_ratio: float = 0.5,
    blurry_sample_ratio: float = 0.1,
    stochastic: bool = True,
    seed: int = 0,
) -> SiBlurrySplit:
    """Split a training set into the tasks of Si-Blurry (Moon et al., "Online Class Incremental Learning on
    Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023), or of i-Blurry (Koh et
    al., "Online Continual Learning on Class Incremental Blurry Task Configuration with Anytime Inference",
    ICLR 2022) when ``stochastic=False``.

    1. The classes are permuted (seeded); the first ``floor(C * disjoint_class_ratio)`` are *disjoint*
       (all their samples in one task), the rest *blurry*.
    2. Each group is cut into ``num_tasks`` chunks of consecutive classes: at ``num_tasks - 1`` random cut
       points when ``stochastic`` (classes per task vary, a task may get none), evenly otherwise.
    3. ``floor(blurry_sample_ratio * B)`` of the ``B`` blurry-class samples are pooled, shuffled and dealt
       across the tasks. Stochastic: the pool is cut at random points into per-task amounts ``a_t``; task
       ``t`` gives ``a_t`` of its own blurry samples (at most all of them) and receives ``a_t`` from the pool.
       i-Blurry: each task gives ``floor(ratio * B_t)`` and the pool is dealt evenly.
    4. Each task's list is shuffled.

    Every sample appears in exactly one task. Differences from the official sampler (on purpose): no class
    and no pooled sample is dropped when counts do not divide by ``num_tasks`` (the first tasks take the
    remainder), and the samples a task gives to the pool are drawn at random instead of being the first
    ones in data-set order (which, for class-sorted data sets, would be whole classes).

    Args:
        labels: ``[N]`` non-negative integer class labels of the training set.
        num_tasks: number of tasks ``T``.
        disjoint_class_ratio: share ``N`` of disjoint classes (1 = disjoint class-incremental, 0 = all blurry).
        blurry_sample_ratio: share ``M`` of blurry-class samples dealt across tasks.
        stochastic: random task boundaries (Si-Blurry) instead of equal ones (i-Blurry).
        seed: seed of every random choice.

    Returns:
        :class:`SiBlurrySplit`.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("labels must be non-negative integers (class ids)")
    if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks}")
    num_tasks = int(num_tasks)
    for name, ratio in (("disjoint_class_ratio", disjoint_class_ratio), ("blurry_sample_ratio", blurry_sample_ratio)):
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] (a share, not a percentage), got {ratio}")
    labels = labels.astype(np.int64)
    rng = np.random.default_rng(int(seed))

    order = rng.permutation(np.unique(labels))
    num_disjoint = _floor_share(len(order), float(disjoint_class_ratio))
    disjoint_classes = _chunks(order[:num_disjoint], num_tasks, stochastic, rng)
    blurry_classes = _chunks(order[num_disjoint:], num_tasks, stochastic, rng)

    disjoint = [np.flatnonzero(np.isin(labels, c)) for c in disjoint_classes]
    blurry = [np.flatnonzero(np.isin(labels, c)) for c in blurry_classes]
    home_counts = np.array([len(b) for b in blurry])
    if stochastic:
        pooled = _floor_share(int(home_counts.sum()), float(blurry_sample_ratio))
        if pooled > 0:
            cuts = np.sort(rng.integers(0, pooled, num_tasks - 1))
            amounts = np.diff([0, *cuts.tolist(), pooled])
        else:
            amounts = np.zeros(num_tasks, np.int64)
        give, receive = np.minimum(amounts, home_counts), amounts
    else:
        give = np.array([_floor_share(int(n), float(blurry_sample_ratio)) for n in home_counts], dtype=np.int64)
        receive = np.array([len(p) for p in np.array_split(np.arange(int(give.sum())), num_tasks)], dtype=np.int64)

    pool: list[np.ndarray] = []
    for t in range(num_tasks):
        chosen = rng.choice(len(blurry[t]), int(give[t]), replace=False)
        keep = np.ones(len(blurry[t]), dtype=bool)
        keep[chosen] = False
        pool.append(blurry[t][np.sort(chosen)])
        blurry[t] = blurry[t][keep]
    blurred = rng.permutation(np.concatenate(pool).astype(np.int64))
    # a task may have had fewer blurry samples than its amount: later tasks then receive fewer
    starts = np.minimum(np.concatenate([[0], np.cumsum(receive)]), len(blurred))
    tasks = []
    for t in range(num_tasks):
        members = np.concatenate([disjoint[t], blurry[t], blurred[starts[t] : starts[t + 1]]]).astype(np.int64)
        tasks.append(rng.permutation(members))
    return SiBlurrySplit(
        tasks=tasks,
        disjoint_classes=[np.asarray(c, dtype=np.int64) for c in disjoint_classes],
        blurry_classes=[np.asarray(c, dtype=np.int64) for c in blurry_classes],
        blurred=blurred,
    )


# --------------------------------------------------------------------------------------------------
# the batch and the schedule
# --------------------------------------------------------------------------------------------------
class StreamBatch(NamedTuple):
    """What the stream's training loader yields (PyTorch's default collate keeps the NamedTuple).

    Attributes:
        x: inputs ``[B, ...]``, freshly augmented each time a sample is fetched (seeded per step and row
            by the stream's ``seed``, see :class:`SiBlurryStream`).
        y: long ``[B]``, labels in exposure order (class ``k`` is the ``k``-th class to appear in the stream).
        num_seen: long ``[B]``, the number of classes exposed when this step runs (same value in every row).
        is_new: bool ``[B]``, True for stream samples, False for replayed memory samples.
    """

    x: Tensor
    y: Tensor
    num_seen: Tensor
    is_new: Tensor


@dataclass(frozen=True)
class StreamStep:
    """One training step (one Lightning batch) of the schedule.

    Attributes:
        stream_batch: index of the stream batch (of new samples) this step trains on.
        samples_seen: stream samples fed so far, this batch included (offline: distinct samples).
        num_seen: classes exposed so far, this batch included.
        task: task of this batch.
        last_rep: last of the ``online_iter`` repetitions of this stream batch (offline: a batch of the
            task's last epoch).
        task_end: last step of its task. A task that the stochastic split left without samples has no
            step, hence no ``task_end``.
    """

    stream_batch: int
    samples_seen: int
    num_seen: int
    task: int
    last_rep: bool
    task_end: bool


class _Plan(NamedTuple):
    steps: list[StreamStep]
    rows: list[np.ndarray]  # per step: dataset indices of its new samples
    enter_memory: list[np.ndarray]  # per step: stream samples added to the reservoir after the step


def _build_plan(
    tasks: list[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    online: bool,
    online_iter: Fraction,
    epochs_per_task: int,
    seed: int,
) -> tuple[_Plan, list[int]]:
    """The schedule and the exposure order (original labels in order of first appearance)."""
    exposed: dict[int, int] = {}
    steps: list[StreamStep] = []
    rows: list[np.ndarray] = []
    enter: list[np.ndarray] = []
    empty = np.zeros(0, dtype=np.int64)
    credit = Fraction(0)
    seen = 0
    stream_batch = 0
    shuffle_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3]))

    def expose(batch: np.ndarray) -> int:
        for label in labels[batch].tolist():
            exposed.setdefault(int(label), len(exposed))
        return len(exposed)

    for task, members in enumerate(tasks):
        first_step = len(steps)
        batches = [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        if online:
            for batch in batches:
                seen += len(batch)
                num_seen = expose(batch)
                credit += online_iter
                reps = int(credit)  # fractional repetitions carry over to later batches
                credit -= reps
                for rep in range(reps):
                    last = rep == reps - 1
                    steps.append(StreamStep(stream_batch, seen, num_seen, task, last, False))
                    rows.append(batch)
                    enter.append(batch if last else empty)
                stream_batch += 1
        else:
            for epoch in range(epochs_per_task):
                # the first pass follows the stream order; later passes reshuffle
                order = members if epoch == 0 else members[shuffle_rng.permutation(len(members))]
                for i in range(0, len(order), batch_size):
                    batch = order[i : i + batch_size]
                    if epoch == 0:
                        seen += len(batch)
                    num_seen = expose(batch)
                    last = epoch == epochs_per_task - 1
                    steps.append(StreamStep(stream_batch, seen, num_seen, task, last, False))
                    rows.append(batch)
                    enter.append(batch if epoch == 0 else empty)
                    stream_batch += 1
        if len(steps) > first_step:
            end = steps[-1]
            steps[-1] = StreamStep(end.stream_batch, end.samples_seen, end.num_seen, end.task, end.last_rep, True)
    class_order = sorted(exposed, key=exposed.__getitem__)
    return _Plan(steps, rows, enter), class_order


# --------------------------------------------------------------------------------------------------
# datasets and loaders
# --------------------------------------------------------------------------------------------------
def _labels_of(dataset: Dataset, what: str) -> np.ndarray:
    for name in ("labels", "targets"):
        values = getattr(dataset, name, None)
        if values is None:
            continue
        if isinstance(values, dict):
            raise TypeError(
                f"SiBlurryStream: the source's {what} set has dict targets; build the source with as_dict=False"
            )
        return np.asarray(values.cpu() if isinstance(values, Tensor) else values, dtype=np.int64).reshape(-1)
    # no label attribute: read the items (slow, decodes every sample once)
    out = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        label = dataset[index][1]
        if isinstance(label, dict):
            raise TypeError(
                f"SiBlurryStream: the source's {what} set has dict targets; build the source with as_dict=False"
            )
        out.append(int(label))
    return np.asarray(out, dtype=np.int64)


def _identity(x: Any) -> Any:
    return x


def _with_eval_transform(dataset: Dataset, source: Any) -> Dataset:
    """A shallow copy of a training dataset that applies the source's evaluation transform instead."""
    if not hasattr(dataset, "transform"):
        return dataset  # in-memory tensors without augmentation: nothing to swap
    swapped = copy.copy(dataset)
    transform = getattr(source, "eval_transform", None)
    swapped.transform = transform if transform is not None else _identity
    return swapped


class _Relabelled(Dataset):
    """Items ``(x, exposure label)`` of the rows ``indices`` of a ``(x, label)`` dataset."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, exposure: np.ndarray) -> None:
        self.dataset, self.indices, self.exposure = dataset, np.asarray(indices, dtype=np.int64), exposure

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> Tensor:
        return torch.from_numpy(self.exposure[self.indices])

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        row = int(self.indices[index])
        x, _ = self.dataset[row]
        return x, torch.tensor(self.exposure[row], dtype=torch.long)


class _StepKeys(list):
    """The ``(row, num_seen, is_new)`` keys of one step (a list, as a batch sampler yields), with ``seeds``:
    per key, the seed of its augmentation."""

    def __init__(self, keys: list[tuple[int, int, bool]], seeds: list[int]) -> None:
        super().__init__(keys)
        self.seeds = seeds


class _StreamItems(Dataset):
    """Fetches ``(row, num_seen, is_new)`` keys as :class:`StreamBatch` items (the source's transform runs
    on every fetch, so each repetition of a sample is augmented afresh).

    A step's keys (:class:`_StepKeys`) are fetched together (``__getitems__``), each with torch's CPU
    generator seeded by its key's seed inside :func:`torch.random.fork_rng`: the augmentation of every
    sample of every step is a function of the stream and its seed, not of the process's random state (which
    a checkpoint does not hold), and the caller's random state is left untouched."""

    def __init__(self, dataset: Dataset, exposure: np.ndarray) -> None:
        self.dataset, self.exposure = dataset, exposure

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitems__(self, keys: list[tuple[int, int, bool]]) -> list[StreamBatch]:
        seeds = getattr(keys, "seeds", None)
        if seeds is None:
            return [self[key] for key in keys]
        with torch.random.fork_rng(devices=[]):
            items = []
            for key, seed in zip(keys, seeds, strict=True):
                torch.default_generator.manual_seed(int(seed))
                items.append(self[key])
        return items

    def __getitem__(self, key: tuple[int, int, bool]) -> StreamBatch:
        row, num_seen, is_new = key
        x, _ = self.dataset[int(row)]
        return StreamBatch(
            x,
            torch.tensor(self.exposure[row], dtype=torch.long),
            torch.tensor(num_seen, dtype=torch.long),
            torch.tensor(bool(is_new)),
        )


def _rank_and_world() -> tuple[int, int]:
    return distributed_rank(), distributed_world_size()


class _StreamBatchSampler(Sampler[list]):
    """Yields the keys of every step from the data module's resume position on.

    The reservoir memory is replayed from the start of the stream on every iteration (integer work only),
    so the memory, and hence every batch, is a function of the stream and the seed alone; so are the
    augmentations: key ``j`` of step ``s`` is augmented with torch's generator seeded by word ``j`` of
    ``SeedSequence([seed, 5, s])`` (seeds drawn for the whole step, then shared out with the keys, so a rank
    augments its rows as a single process would). A resumed run sees exactly the batches of an
    uninterrupted one.
    """

    def __init__(self, stream: SiBlurryStream) -> None:
        self.stream = stream
        self.plan = stream._plan()

    def __len__(self) -> int:
        return len(self.plan.steps)

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        stream, plan = self.stream, self.plan
        start = stream._consumed
        rank, world = _rank_and_world()  # read now: the process group exists only once training runs
        reservoir_rng = np.random.default_rng(np.random.SeedSequence([stream.seed, 11]))
        memory: list[int] = []
        seen = 0
        for index, step in enumerate(plan.steps):
            if index >= start:
                keys = [(int(r), step.num_seen, True) for r in plan.rows[index]]
                if stream.memory_size and stream.memory_batch_size and memory:
                    draw = np.random.default_rng(np.random.SeedSequence([stream.seed, 7, index]))
                    picks = draw.choice(len(memory), min(stream.memory_batch_size, len(memory)), replace=False)
                    keys += [(memory[p], step.num_seen, False) for p in picks.tolist()]
                seeds = np.random.SeedSequence([stream.seed, 5, index]).generate_state(len(keys)).tolist()
                share, share_seeds = keys[rank::world], seeds[rank::world]
                if not share:
                    # a short last batch can leave a rank without a row: repeat one rather than stall DDP
                    share, share_seeds = [keys[rank % len(keys)]], [seeds[rank % len(keys)]]
                yield _StepKeys(share, share_seeds)
            if stream.memory_size:
                for row in plan.enter_memory[index].tolist():
                    seen += 1
                    if len(memory) < stream.memory_size:
                        memory.append(int(row))
                    else:
                        slot = int(reservoir_rng.integers(0, seen))
                        if slot < stream.memory_size:
                            memory[slot] = int(row)


class _StreamLoader(DataLoader):
    """The training loader; stateful (``state_dict`` / ``load_state_dict``) through its data module so that
    Lightning treats it as resumable."""

    def __init__(self, *args: Any, stream: SiBlurryStream, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = stream

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stream._set_position(state_dict)


# --------------------------------------------------------------------------------------------------
# the data module
# --------------------------------------------------------------------------------------------------
class SiBlurryStream(pl.LightningDataModule):
    """Online class-incremental stream of Si-Blurry (Moon et al., "Online Class Incremental Learning on
    Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023) over any image data module.

    The source's training set is split into tasks by :func:`si_blurry_split` and served as ONE Lightning
    epoch (train with ``max_epochs=1``) whose batches are :class:`StreamBatch` items; :attr:`schedule` has
    one :class:`StreamStep` per batch (index = ``batch_idx``).

    * Online (``online=True``): each task's list is cut into stream batches of ``batch_size`` new samples
      (the last one of a task may be shorter); each stream batch is trained on ``online_iter`` times, each
      time freshly augmented. A fractional ``online_iter`` carries over: 1.5 gives 1, 2, 1, 2, ... steps.
    * Offline class-incremental (``online=False``): ``epochs_per_task`` shuffled passes over each task,
      task after task (the first pass follows the stream order).
    * Labels are relabelled to exposure order: class ``k`` is the ``k``-th class to appear in the stream
      (:attr:`class_order` maps back); ``num_seen`` is the number of classes exposed so far.
    * Replay (``memory_size > 0``): a reservoir memory of stream samples (algorithm R of Vitter, "Random
      Sampling with a Reservoir", ACM TOMS 1985, as in the official ER), updated after the last repetition
      of each stream batch (offline: after the first pass of each batch); each step appends
      ``memory_batch_size`` distinct samples drawn from the memory as it was before the current stream
      batch (all of it when smaller). The memory and the draws are functions of the stream and ``seed``:
      the reservoir's slots come from ``np.random.default_rng(SeedSequence([seed, 11]))``, the draws of
      step ``s`` from ``SeedSequence([seed, 7, s])``.
    * Augmentation: the source's training transform draws from torch's CPU generator, seeded for row ``j``
      of step ``s`` by word ``j`` of ``SeedSequence([seed, 5, s])`` (inside ``torch.random.fork_rng``, so
      the process's random state is untouched): the augmentations too are a function of the stream and
      ``seed`` (vary ``seed``, not only ``seed_everything``, for another draw), identical under DDP and with
      loader workers. A transform drawing from Python's ``random`` or NumPy's global generator is not seeded.
    * Resume: the data module counts the training batches it hands to the model
      (``on_before_batch_transfer``) and saves the count in its ``state_dict``; a run resumed from a
      mid-stream checkpoint continues the same stream. Do not override ``on_before_batch_transfer`` in the
      model (Lightning then calls the model's hook instead of this one).
    * DDP: each rank takes rows ``rank::world`` of every step; build the trainer with
      ``Trainer(use_distributed_sampler=False)``.

    Batch sizes follow the official code's meaning: its ``--batchsize 64`` is a step of ``temp_batchsize
    = 32`` stream samples plus up to 32 memory samples, i.e. ``batch_size=32, memory_batch_size=32`` here
    (``memory_batch_size`` defaults to ``batch_size``).

    Args:
        source: data module whose ``train_set`` / ``test_set`` hold ``(x, label)`` items after ``setup()``
            (Digits, CIFAR10/100, TinyImageNet, ImageNetR ... with ``as_dict=False``). Its training transform
            is the stream's augmentation; its evaluation transform serves :meth:`task_dataset` / tests.
        num_tasks: number of tasks.
        disjoint_class_ratio: share of disjoint classes (paper: 0.5).
        blurry_sample_ratio: share of blurry-class samples dealt across tasks (paper: 0.1).
        stochastic: Si-Blurry's random task boundaries; False gives i-Blurry's equal ones.
        online: online stream (True) or offline class-incremental epochs per task (False).
        online_iter: training steps per stream batch (online; >= 1, fractions carry over).
        epochs_per_task: passes over each task (offline).
        batch_size: new stream samples per step.
        memory_size: capacity of the reservoir memory (0: no replay).
        memory_batch_size: memory samples appended to each step (default ``batch_size``).
        eval_batch_size: batch size of the test / validation loaders (default ``2 * batch_size``, as the
            official evaluation).
        num_workers: DataLoader workers.
        seed: seed of the split, the offline shuffles, the memory and the augmentations.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        source: pl.LightningDataModule,
        num_tasks: int = 5,
        disjoint_class_ratio: float = 0.5,
        blurry_sample_ratio: float = 0.1,
        stochastic: bool = True,
        online: bool = True,
        online_iter: float = 3.0,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        memory_size: int = 0,
        memory_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if not callable(getattr(source, "setup", None)):
            raise TypeError(
                f"source must be a data module (setup(), then train_set / test_set), got {type(source).__name__}"
            )
        if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive integer, got {num_tasks}")
        ratios = (("disjoint_class_ratio", disjoint_class_ratio), ("blurry_sample_ratio", blurry_sample_ratio))
        for name, ratio in ratios:
            if not 0.0 <= float(ratio) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (a share, not a percentage), got {ratio}")
        if not float(online_iter) >= 1.0 or not math.isfinite(float(online_iter)):
            raise ValueError(f"online_iter must be a finite number >= 1 (steps per stream batch), got {online_iter}")
        if int(epochs_per_task) != epochs_per_task or epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be a positive integer, got {epochs_per_task}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if int(memory_size) != memory_size or memory_size < 0:
            raise ValueError(f"memory_size must be a non-negative integer, got {memory_size}")
        if memory_batch_size is not None and (int(memory_batch_size) != memory_batch_size or memory_batch_size < 0):
            raise ValueError(f"memory_batch_size must be a non-negative integer, got {memory_batch_size}")
        if eval_batch_size is not None and (int(eval_batch_size) != eval_batch_size or eval_batch_size < 1):
            raise ValueError(f"eval_batch_size must be a positive integer, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        # duck typed: any data module whose setup() fills train_set / test_set (not LightningDataModule attributes)
        self.source: Any = source
        self.num_tasks = int(num_tasks)
        self.disjoint_class_ratio = float(disjoint_class_ratio)
        self.blurry_sample_ratio = float(blurry_sample_ratio)
        self.stochastic = bool(stochastic)
        self.online = bool(online)
        self.online_iter = float(online_iter)
        self.epochs_per_task = int(epochs_per_task)
        self.batch_size = int(batch_size)
        self.memory_size = int(memory_size)
        self.memory_batch_size = int(memory_batch_size) if memory_batch_size is not None else self.batch_size
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else 2 * self.batch_size
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self._split: SiBlurrySplit | None = None
        self._built: _Plan | None = None
        self._class_order: list[int] = []
        self._train_exposure = np.zeros(0, dtype=np.int64)
        self._test_exposure = np.zeros(0, dtype=np.int64)
        self._test_labels = np.zeros(0, dtype=np.int64)
        self._consumed = 0  # training batches handed to the model in this fit
        self._resume_at = 0  # position restored from a checkpoint, applied by the next train_dataloader()
        self.save_hyperparameters(ignore=["source"])

    # --- building -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is not None:
            connector = getattr(trainer, "_accelerator_connector", None)
            if connector is not None and connector.is_distributed and connector.use_distributed_sampler:
                raise RuntimeError(
                    "SiBlurryStream splits every step across ranks itself: build the trainer with "
                    "Trainer(use_distributed_sampler=False)."
                )
        self._build()

    def _build(self) -> None:
        if self._built is not None:
            return
        self.source.setup("fit")
        train_set, test_set = self.source.train_set, self.source.test_set
        if train_set is None or test_set is None:
            raise RuntimeError(f"{type(self.source).__name__}.setup() did not build train_set / test_set")
        train_labels = _labels_of(train_set, "train")
        self._test_labels = _labels_of(test_set, "test")
        # keyword arguments: the official trainer passed them positionally and always ran the stochastic mode
        self._split = si_blurry_split(
            train_labels,
            num_tasks=self.num_tasks,
            disjoint_class_ratio=self.disjoint_class_ratio,
            blurry_sample_ratio=self.blurry_sample_ratio,
            stochastic=self.stochastic,
            seed=self.seed,
        )
        plan, class_order = _build_plan(
            self._split.tasks,
            train_labels,
            self.batch_size,
            self.online,
            Fraction(self.online_iter).limit_denominator(10**6),
            self.epochs_per_task,
            self.seed,
        )
        size = int(max(train_labels.max(), self._test_labels.max(initial=0))) + 1
        exposure = np.full(size, -1, dtype=np.int64)
        exposure[class_order] = np.arange(len(class_order))
        unknown = np.setdiff1d(np.unique(self._test_labels), class_order)
        if len(unknown):
            raise ValueError(f"test labels {unknown.tolist()} never appear in the training stream")
        self._class_order = class_order
        self._train_exposure = exposure[train_labels]
        self._test_exposure = exposure[self._test_labels]
        self._built = plan

    def _plan(self) -> _Plan:
        self._build()
        assert self._built is not None
        return self._built

    # --- metadata ---------------------------------------------------------------------------------
    @property
    def schedule(self) -> list[StreamStep]:
        """One :class:`StreamStep` per training step (index = Lightning ``batch_idx``)."""
        return self._plan().steps

    @property
    def split(self) -> SiBlurrySplit:
        """The :class:`SiBlurrySplit` of the source's training set (builds it on first use)."""
        self._plan()
        assert self._split is not None
        return self._split

    @property
    def num_classes(self) -> int:
        """Number of classes of the stream (builds the split on first use)."""
        self._plan()
        return len(self._class_order)

    @property
    def class_order(self) -> list[int]:
        """Original labels in exposure order."""
        self._plan()
        return list(self._class_order)

    def task_dataset(self, task: int) -> Dataset:
        """``(x, exposure label)`` of the stream samples of ``task``, with the source's evaluation transform."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        dataset = _with_eval_transform(self.source.train_set, self.source)
        return _Relabelled(dataset, self.split.tasks[task], self._train_exposure)

    def test_dataset(self, num_seen: int) -> Dataset:
        """``(x, exposure label)`` of the test samples of the first ``num_seen`` exposed classes."""
        self._plan()
        rows = np.flatnonzero(self._test_exposure < int(num_seen))
        return _Relabelled(self.source.test_set, rows, self._test_exposure)

    # --- loaders ----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self._build()
        # a new fit starts at the beginning unless a checkpoint was just restored
        self._consumed, self._resume_at = self._resume_at, 0
        return _StreamLoader(
            _StreamItems(self.source.train_set, self._train_exposure),
            batch_sampler=_StreamBatchSampler(self),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            stream=self,
        )

    def _eval_loader(self) -> DataLoader:
        self._build()
        return DataLoader(
            _Relabelled(self.source.test_set, np.arange(len(self._test_labels)), self._test_exposure),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def test_dataloader(self) -> DataLoader:
        """All test samples in order, as ``(x, exposure label)``."""
        return self._eval_loader()

    def val_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader` (the protocol evaluates on the test split)."""
        return self._eval_loader()

    # --- resume -----------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self._consumed, "num_steps": len(self._built.steps) if self._built else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set_position(state_dict)
        self._resume_at = self._consumed

    def _set_position(self, state_dict: dict[str, Any]) -> None:
        expected = state_dict.get("num_steps")
        if expected is not None and self._built is not None and expected != len(self._built.steps):
            raise ValueError(
                f"the checkpoint's stream has {expected} steps but this one has {len(self._built.steps)}: "
                "resume with the same source, seed and stream arguments"
            )
        self._consumed = int(state_dict.get("consumed_batches", 0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={type(self.source).__name__}, num_tasks={self.num_tasks}, "
            f"online={self.online}, batch_size={self.batch_size}, memory_size={self.memory_size})"
        )
