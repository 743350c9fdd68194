"""Corrupted binary digit tasks as sources, one corrupted task with few labels as the target (no download)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl.selection.lasso import SourceBudgetSampler
from lightning_mtl.selection.samplers import ResumableBatches, largest_remainder

__all__ = ["CORRUPTIONS", "DigitsMLP", "DigitsSources"]


def _blur(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
    total = np.zeros_like(images)
    for i in range(3):
        for j in range(3):
            total = total + padded[:, i : i + 8, j : j + 8]
    return total / 9.0


# each maps [n, 8, 8] images in [0, 1] to corrupted images; the generator seeds the noise
CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "identity": lambda x, rng: x,
    "rotate": lambda x, rng: np.rot90(x, k=1, axes=(1, 2)),
    "invert": lambda x, rng: 1.0 - x,
    "noise": lambda x, rng: np.clip(x + rng.normal(0.0, 0.3, x.shape), 0.0, 1.0),
    "blur": _blur,
    "flip": lambda x, rng: x[:, :, ::-1],
}


class DigitsMLP(nn.Module):
    """The representation of the Lasso benchmark: flatten, ``Linear -> ReLU`` twice (``out_features`` wide).

    Args:
        in_features: pixels of an input (64 for the 8 x 8 digits).
        hidden: width of the first layer.
        out_features: size of the representation.
    """

    def __init__(self, in_features: int = 64, hidden: int = 64, out_features: int = 32) -> None:
        super().__init__()
        self.out_features = int(out_features)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _SourceItems(Dataset):
    """Item ``i`` of the concatenated sources: ``(image [1, 8, 8], {source: 0/1, other sources: missing})``."""

    def __init__(self, images: Tensor, labels: Tensor, source: Tensor, names: Sequence[str]) -> None:
        self.images, self.labels, self.source, self.names = images, labels, source, list(names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        own = int(self.source[index])
        missing = torch.tensor(MISSING_LABEL)
        return self.images[index], {n: self.labels[index] if m == own else missing for m, n in enumerate(self.names)}


class DigitsSources(ResumableBatches, pl.LightningDataModule):
    """Source tasks ``<corruption>_<digit>`` (digit-vs-rest on corrupted sklearn digits) and one target task.

    The 1,797 sklearn digits are split (seeded) into a source pool (60 %) and a target pool. Each
    source applies one corruption (:data:`CORRUPTIONS`) to the source pool and labels ``digit`` vs the
    rest, balanced (all the pool's images of ``digit`` and as many others, drawn seeded). The target
    is the task ``target`` (e.g. ``"invert_3"``) on the target pool: ``target_labels`` labelled
    images (half positives) for its head, the rest of the pool for its test accuracy
    (:meth:`target_test`). When ``target`` is one of the sources, that source is the planted relevant
    one: same task, other images.

    The training loader draws ``budgets[m]`` samples of source ``m`` per epoch
    (:class:`~lightning_mtl.selection.SourceBudgetSampler`, equal budgets at first), in batches
    ``(x, {source: label})`` with the other sources' labels missing; an
    :class:`~lightning_mtl.selection.ActiveSourceSelection` callback resets the budgets at each epoch's
    end through :meth:`set_budgets` and :meth:`relevance_data`. The budgets and the training batches
    consumed in the current epoch are saved in checkpoints: a fit resumed mid-epoch continues the epoch.

    Args:
        corruptions: names of :data:`CORRUPTIONS` (the sources are every corruption x digit).
        digits: the digits of the binary tasks.
        target: the target task, ``"<corruption>_<digit>"``.
        target_labels: labelled target images.
        total_budget: source samples per epoch.
        estimation_size: labelled images per source for the relevance estimate (balanced).
        batch_size: samples per batch (per rank under DDP).
        seed: seed of the split, the noise and the sampling.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        corruptions: Sequence[str] = ("identity", "rotate", "invert", "noise", "blur"),
        digits: Sequence[int] = (0, 1, 2, 3),
        target: str = "invert_3",
        target_labels: int = 40,
        total_budget: int = 1000,
        estimation_size: int = 100,
        batch_size: int = 50,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption(s) {unknown}; known: {', '.join(CORRUPTIONS)}")
        if any(not 0 <= int(d) <= 9 for d in digits) or not digits:
            raise ValueError(f"digits must be a non-empty list of 0..9, got {list(digits)}")
        corruption, _, digit = target.rpartition("_")
        if corruption not in CORRUPTIONS or not digit.isdigit() or not 0 <= int(digit) <= 9:
            raise ValueError(f"target must be '<corruption>_<digit>' with a known corruption, got {target!r}")
        if target_labels < 2 or total_budget < 1:
            raise ValueError(f"need target_labels >= 2 and total_budget >= 1, got {target_labels}, {total_budget}")
        self.corruptions, self.digits = list(corruptions), [int(d) for d in digits]
        self.target, self.target_labels, self.total_budget = target, int(target_labels), int(total_budget)
        self.estimation_size, self.batch_size = int(estimation_size), int(batch_size)
        self.seed, self.num_workers = int(seed), int(num_workers)
        self.source_names = tuple(f"{c}_{d}" for c in self.corruptions for d in self.digits)
        self.budgets = largest_remainder(np.ones(len(self.source_names)), self.total_budget)
        self.sampler: SourceBudgetSampler | None = None
        self._data: dict[str, Any] | None = None
        self._epoch, self._consumed, self._resume = 0, 0, None  # ResumableBatches' bookkeeping

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.source_names

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    # --- building -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        from sklearn.datasets import load_digits  # a file bundled with scikit-learn: nothing downloads

        bunch = load_digits()
        images, labels = np.asarray(bunch.images, dtype=np.float64) / 16.0, np.asarray(bunch.target)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(labels))
        pool, rest = order[: int(0.6 * len(order))], order[int(0.6 * len(order)) :]
        corrupted = {
            c: CORRUPTIONS[c](images, np.random.default_rng([self.seed, i])) for i, c in enumerate(CORRUPTIONS)
        }

        xs, ys, src, estimation = [], [], [], {}
        for m, (c, d) in enumerate((c, d) for c in self.corruptions for d in self.digits):
            chosen = _balanced(
                labels[pool] == d, 2 * int((labels[pool] == d).sum()), np.random.default_rng([self.seed, 10, m])
            )
            idx = pool[chosen]
            xs.append(corrupted[c][idx])
            ys.append((labels[idx] == d).astype(np.int64))
            src.append(np.full(len(idx), m))
            few = _balanced(
                labels[idx] == d, min(self.estimation_size, len(idx)), np.random.default_rng([self.seed, 11, m])
            )
            estimation[self.source_names[m]] = (_tensor(corrupted[c][idx[few]]), torch.as_tensor(ys[-1][few]))
        target_corruption, _, target_digit = self.target.rpartition("_")
        positive = labels[rest] == int(target_digit)
        labelled = _balanced(positive, self.target_labels, np.random.default_rng([self.seed, 12]))
        test = np.setdiff1d(np.arange(len(rest)), labelled)
        self._data = {
            "images": _tensor(np.concatenate(xs)),
            "labels": torch.as_tensor(np.concatenate(ys)),
            "source": torch.as_tensor(np.concatenate(src)),
            "estimation": estimation,
            "target_train": (
                _tensor(corrupted[target_corruption][rest[labelled]]),
                torch.as_tensor(positive[labelled].astype(np.int64)),
            ),
            "target_test": (
                _tensor(corrupted[target_corruption][rest[test]]),
                torch.as_tensor(positive[test].astype(np.int64)),
            ),
        }

    def _built(self) -> dict[str, Any]:
        self.setup()
        assert self._data is not None
        return self._data

    @property
    def source_sizes(self) -> list[int]:
        """Samples of each source."""
        return torch.bincount(self._built()["source"], minlength=len(self.source_names)).tolist()

    def relevance_data(self) -> tuple[dict[str, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        """``({source: (images, labels)}, (target images, labels))``: the estimation samples."""
        data = self._built()
        return dict(data["estimation"]), data["target_train"]

    def target_test(self) -> tuple[Tensor, Tensor]:
        """The target pool's images and labels not used for the target head."""
        return self._built()["target_test"]

    def set_budgets(self, budgets: Sequence[int]) -> None:
        """Samples of each source (in :attr:`source_names` order) from the next epoch on."""
        values = np.asarray(budgets, dtype=np.int64)
        if len(values) != len(self.source_names) or int(values.sum()) != self.total_budget or (values < 0).any():
            raise ValueError(
                f"budgets must be {len(self.source_names)} non-negative integers summing to {self.total_budget}, "
                f"got {values.tolist()}"
            )
        self.budgets = values
        if self.sampler is not None:
            self.sampler.set_budgets(values)

    # --- loaders ------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        data = self._built()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = SourceBudgetSampler(self.source_sizes, self.budgets, self.batch_size, self.seed, rank, world)
        self._resume_sampler(self.sampler)
        return DataLoader(
            _SourceItems(data["images"], data["labels"], data["source"], self.source_names),
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"budgets": self.budgets.tolist(), **super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_budgets(state_dict["budgets"])
        super().load_state_dict(state_dict)


def _balanced(positive: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``size`` rows, half of them positive where there are enough (all positives at most)."""
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    half = min(len(pos), size // 2)
    return np.sort(
        np.concatenate(
            [rng.choice(pos, half, replace=False), rng.choice(neg, min(size - half, len(neg)), replace=False)]
        )
    )


def _tensor(images: np.ndarray) -> Tensor:
    return torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32).unsqueeze(1)
