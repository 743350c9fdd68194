"""Synthetic sorting with hint tasks, as token sequences for a decoder-only transformer (no download)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_mtl.selection.samplers import EpochForward, ResumableBatches

__all__ = ["HINT_TASKS", "SORTING_TASKS", "SortingTasks", "make_example", "vocab_size"]

# the main task first; every task owns a task-id token whatever the run trains on, so one vocabulary (and one
# model) serves every data mixture
SORTING_TASKS = ("sort", "successor", "copy", "min")
HINT_TASKS = SORTING_TASKS[1:]
IGNORE = -100  # targets the loss skips (the prompt, the padding)


def vocab_size(num_values: int) -> int:
    """Values ``0 .. num_values - 1``, then ``SEP``, ``PAD`` and one task-id token per task."""
    return int(num_values) + 2 + len(SORTING_TASKS)


def _sep(num_values: int) -> int:
    return int(num_values)


def _pad(num_values: int) -> int:
    return int(num_values) + 1


def _task_token(task: str, num_values: int) -> int:
    return int(num_values) + 2 + SORTING_TASKS.index(task)


def make_example(task: str, values: Sequence[int], num_values: int, query: int | None = None) -> tuple[Tensor, Tensor]:
    """One task instance as ``(tokens, targets)`` of the same length (next-token targets, prompt ignored).

    The prompt is ``[task, x_1 .. x_n, SEP]``; the answer follows it and the model predicts each answer
    token from the tokens before it:

    - ``sort``: the ``n`` values in non-decreasing order (repeats kept);
    - ``successor``: the prompt also carries a query ``q`` (an element of the sequence) after ``SEP``; the
      answer is the element that follows the first occurrence of ``q`` in sorted order, so ``q`` itself
      when ``q`` repeats (the one step a sorter takes after writing ``q``);
    - ``copy``: the values in input order;
    - ``min``: the smallest value.

    Args:
        task: one of :data:`SORTING_TASKS`.
        values: the input sequence, integers in ``[0, num_values)``.
        num_values: size of the value alphabet.
        query: for ``successor``, the index into the sorted sequence of the queried element (``0 .. n - 2``).
    """
    if task not in SORTING_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(SORTING_TASKS)}")
    x = [int(v) for v in values]
    if not x or min(x) < 0 or max(x) >= num_values:
        raise ValueError(f"values must be a non-empty sequence of integers in [0, {num_values}), got {x}")
    ordered = sorted(x)
    prompt = [_task_token(task, num_values), *x, _sep(num_values)]
    if task == "sort":
        answer = ordered
    elif task == "copy":
        answer = x
    elif task == "min":
        answer = ordered[:1]
    else:
        if len(x) < 2 or query is None or not 0 <= query < len(x) - 1:
            raise ValueError(f"successor needs at least two values and a query index in [0, {len(x) - 1}), got {query}")
        q = ordered[query]
        prompt.append(q)
        answer = [ordered[ordered.index(q) + 1]]
    tokens = prompt + answer[:-1]
    # position t predicts token t + 1: the last prompt token predicts the first answer token
    targets = [IGNORE] * (len(prompt) - 1) + answer
    return torch.tensor(tokens), torch.tensor(targets)


class _Examples(Dataset):
    def __init__(self, items: list[tuple[Tensor, Tensor]], task: int) -> None:
        self.items, self.task = items, task

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        tokens, targets = self.items[index]
        return tokens, targets, self.task


class _Mixture(Dataset):
    """The training examples of every task, concatenated; item ``i`` carries its task index."""

    def __init__(self, parts: list[_Examples]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]


class _TaskBatches(Sampler[list[int]]):
    """Batches of one task each, shuffled across tasks with a seed that changes every epoch; under DDP each
    rank takes every ``world``-th batch of the same permutation (the same count on every rank).

    The order of an epoch depends only on ``(seed, epoch)``; Lightning sets the epoch (``set_epoch``, reached
    through the ``sampler`` attribute) and :meth:`skip` starts a resumed epoch where its checkpoint left it.
    """

    def __init__(self, offsets: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.offsets, self.batch_size, self.seed = offsets, int(batch_size), int(seed)
        self.rank, self.world, self.epoch = int(rank), int(world), 0
        self.sampler = EpochForward(self)  # where Lightning looks for set_epoch
        self.resume: tuple[int, int] | None = None  # (epoch, batches of it already trained on)

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches: list[list[int]] = []
        for start, stop in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            order = rng.permutation(np.arange(start, stop))
            batches += [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        shuffled = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(shuffled) // self.world * self.world
        return shuffled[self.rank : usable : self.world]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = int(epoch)

    def skip(self, epoch: int, batches: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``batches`` batches (a resumed run); an
        iteration of another epoch starts at its beginning."""
        self.epoch, self.resume = int(epoch), (int(epoch), int(batches))

    def __iter__(self) -> Iterator[list[int]]:
        start = self.resume[1] if self.resume is not None and self.resume[0] == self.epoch else 0
        self.resume = None
        return iter(self._batches()[start:])

    def __len__(self) -> int:
        total = sum(-(-int(b - a) // self.batch_size) for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True))
        return total // self.world


class SortingTasks(ResumableBatches, pl.LightningDataModule):
    """Sorting as the main task plus hint tasks, for task hinting (Awasthi & Gupta, 2023).

    Training sequences have lengths ``min_length .. train_length`` (uniform) with values drawn uniformly from
    ``num_values`` symbols, so repeats occur. The training set holds ``num_train`` sorting examples and,
    for each hint task, ``hint_ratio * num_train / len(hints)`` examples of that task; every batch holds one
    task. Validation and test sets are sorting only, one data loader per length bucket
    (``test_lengths``, up to 5x the training length by default), drawn from separate streams. A batch is
    ``(tokens [B, T], targets [B, T], task [B])``: right-padded tokens, next-token targets with ``-100``
    where the loss ignores them, and the index of each row's task in :data:`SORTING_TASKS`.

    The batch order of an epoch depends only on ``(seed, epoch)``; the batches consumed in the current epoch
    are saved in checkpoints, so a fit resumed mid-epoch continues with the uninterrupted run's batches. Under
    DDP (``use_distributed_sampler=False``) rank ``r`` takes batches ``r, r + world, ...`` of that order.

    Args:
        num_values: size of the value alphabet.
        train_length: the longest training sequence (``L``).
        min_length: the shortest training sequence (2 or more so the successor hint has a query).
        hints: hint tasks mixed into training (from :data:`HINT_TASKS`); ``[]`` trains on sorting alone.
        hint_ratio: hint examples per sorting example (split evenly among the hints).
        num_train: sorting examples in the training set.
        num_val: sorting examples per validation bucket.
        num_test: sorting examples per test bucket.
        test_lengths: the test buckets' sequence lengths; default ``L, 2L, 3L, 4L, 5L``.
        batch_size: examples per batch.
        seed: seeds every set (training, validation and test sets come from separate streams).
        distinct: draw the values of a sequence without replacement (no repeats; needs ``num_values`` at
            least the longest test length).
    """

    def __init__(
        self,
        num_values: int = 64,
        train_length: int = 10,
        min_length: int = 2,
        hints: Sequence[str] = ("successor",),
        hint_ratio: float = 1.0,
        num_train: int = 20000,
        num_val: int = 256,
        num_test: int = 256,
        test_lengths: Sequence[int] | None = None,
        batch_size: int = 64,
        seed: int = 0,
        distinct: bool = False,
    ) -> None:
        super().__init__()
        unknown = [h for h in hints if h not in HINT_TASKS]
        if unknown:
            raise ValueError(f"unknown hint task(s) {unknown}; expected a subset of {list(HINT_TASKS)}")
        if not 2 <= min_length <= train_length:
            raise ValueError(
                f"need 2 <= min_length <= train_length, got min_length={min_length}, train_length={train_length}"
            )
        if hint_ratio < 0:
            raise ValueError(f"hint_ratio must be non-negative, got {hint_ratio}")
        self.num_values, self.train_length, self.min_length = int(num_values), int(train_length), int(min_length)
        self.hints = [str(h) for h in hints]
        self.hint_ratio, self.num_train = float(hint_ratio), int(num_train)
        self.num_val, self.num_test, self.batch_size, self.seed = (
            int(num_val),
            int(num_test),
            int(batch_size),
            int(seed),
        )
        self.test_lengths = [int(n) for n in (test_lengths or [k * self.train_length for k in range(1, 6)])]
        self.distinct = bool(distinct)
        if self.distinct and self.num_values < max(self.test_lengths + [self.train_length]):
            raise ValueError(
                f"distinct=True needs num_values >= the longest sequence ({max(self.test_lengths)}), got {num_values}"
            )
        self._train: _Mixture | None = None
        self._epoch, self._consumed, self._resume = 0, 0, None  # ResumableBatches' bookkeeping
        self._val: list[_Examples] = []
        self._test: list[_Examples] = []

    @property
    def vocab_size(self) -> int:
        """Tokens the model must embed (values, ``SEP``, ``PAD``, task ids)."""
        return vocab_size(self.num_values)

    @property
    def train_tasks(self) -> list[str]:
        """The tasks of the training mixture, sorting first."""
        return ["sort", *self.hints]

    def task_counts(self) -> dict[str, int]:
        """Training examples per task."""
        per_hint = round(self.hint_ratio * self.num_train / len(self.hints)) if self.hints else 0
        return {"sort": self.num_train, **{h: per_hint for h in self.hints}}

    def _examples(self, task: str, count: int, lengths: tuple[int, int], stream: int) -> _Examples:
        # one generator per (seed, task, stream): adding a hint never changes the sorting examples
        rng = np.random.default_rng((self.seed, SORTING_TASKS.index(task), stream))
        items = []
        for _ in range(count):
            n = int(rng.integers(lengths[0], lengths[1] + 1))
            if self.distinct:
                values = rng.choice(self.num_values, size=n, replace=False).tolist()
            else:
                values = rng.integers(0, self.num_values, size=n).tolist()
            query = int(rng.integers(0, n - 1)) if task == "successor" else None
            items.append(make_example(task, values, self.num_values, query))
        return _Examples(items, SORTING_TASKS.index(task))

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        span = (self.min_length, self.train_length)
        self._train = _Mixture([self._examples(t, c, span, 0) for t, c in self.task_counts().items() if c > 0])
        # validation and test: the same buckets from separate streams, so a fit logs the whole curve
        self._val = [self._examples("sort", self.num_val, (n, n), 1 + 2 * n) for n in self.test_lengths]
        self._test = [self._examples("sort", self.num_test, (n, n), 2 + 2 * n) for n in self.test_lengths]

    def collate(self, items: list[tuple[Tensor, Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-pad a list of examples (causal attention never looks right, so no padding mask is needed)."""
        width = max(len(tokens) for tokens, _, _ in items)
        tokens = torch.full((len(items), width), _pad(self.num_values), dtype=torch.long)
        targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for row, (tok, tgt, _) in enumerate(items):
            tokens[row, : len(tok)], targets[row, : len(tgt)] = tok, tgt
        return tokens, targets, torch.tensor([task for _, _, task in items])

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None, "call setup() first"
        rank, world = self._rank_world()
        sampler = _TaskBatches(self._train.offsets, self.batch_size, self.seed, rank, world)
        self._resume_sampler(sampler)
        return DataLoader(self._train, batch_sampler=sampler, collate_fn=self.collate)

    def _eval_loaders(self, parts: list[_Examples]) -> list[DataLoader]:
        return [DataLoader(p, batch_size=self.batch_size, collate_fn=self.collate) for p in parts]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self._val)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self._test)

    def bucket_lengths(self, stage: str) -> list[int]:
        """The sequence length of each evaluation data loader (``"val"`` or ``"test"``)."""
        return list(self.test_lengths)
