"""Multi-task learning on tabular data: feature columns in, one task per target column, from CSV or Parquet."""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np
import torch

from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl.datamodules._common import TensorMultiTaskDataset, _TensorDataModule, check_data_path, split_indices

__all__ = ["TabularMultiTask", "read_table"]


def read_table(path: str) -> dict[str, list]:
    """Columns of a ``.csv`` (header row; stdlib reader) or ``.parquet`` (needs ``pyarrow``) file as lists;
    CSV cells stay strings."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError(
                f'reading {path} needs the optional `pyarrow` package (pip install "lightning-mtl[parquet]"), or save the table as CSV'
            ) from error
        return pq.read_table(path).to_pydict()
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty: a CSV needs a header row with the column names")
        columns: dict[str, list] = {name.strip(): [] for name in header}
        names = list(columns)
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(names):
                raise ValueError(f"{path}, line {line}: {len(row)} cells for {len(names)} columns")
            for name, cell in zip(names, row):
                columns[name].append(cell.strip())
    return columns


def _is_missing(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _to_float(column: str, values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float32)
    for i, value in enumerate(values):
        if _is_missing(value):
            out[i] = np.nan
            continue
        try:
            out[i] = float(value)
        except ValueError:
            raise ValueError(f"column {column!r}, row {i + 1}: {value!r} is not a number") from None
    return out


def _is_integral(values: list) -> bool:
    present = [v for v in values if not _is_missing(v)]
    try:
        return bool(present) and all(float(v) == int(float(v)) and "." not in str(v) for v in present)
    except ValueError:
        return False


class TabularMultiTask(_TensorDataModule):
    """Feature columns -> one task per target column, from a CSV or Parquet table.

    Caruana, "Multitask Learning", Machine Learning 28, 1997, motivated multi-task learning with tabular
    targets that share inputs; this module turns any such table into multi-task batches.

    A target column is a classification task when ``classification`` names it, or (when ``classification``
    is not given) when it holds whole numbers or text; its classes are the sorted distinct values (mapped to
    0..K-1, see :attr:`classes`), and an empty cell is a missing label (``-100``). Any other target is a
    regression task (float, an empty cell is ``NaN``, which the tasks leave out). Feature columns must be
    numbers; empty cells are filled with the training mean. Features are standardized with the training
    split's statistics when ``normalize``.

    Splits: rows are split by ``seed`` into train / val / test with ``val_fraction`` and ``test_fraction``,
    or by ``split_column`` holding ``train`` / ``val`` / ``test``.

    Batches: ``(x float [B, D], {task: long [B] or float [B]})``.

    Args:
        root: the ``.csv`` (header row) or ``.parquet`` file (Parquet needs ``pyarrow``).
        tasks: target columns (also the task names; Python identifiers).
        features: feature columns (default: every column that is not a target or the split column).
        classification: target columns to treat as classes (default: inferred as described).
        split_column: optional column with each row's split.
        val_fraction: share of rows for validation (without ``split_column``).
        test_fraction: share of rows for testing (without ``split_column``).
        normalize: standardize the features.
        batch_size: rows per batch.
        num_workers: DataLoader workers.
        seed: seed of the split and the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        root: str,
        tasks: list[str],
        features: list[str] | None = None,
        classification: list[str] | None = None,
        split_column: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        normalize: bool = True,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if not tasks:
            raise ValueError("TabularMultiTask needs at least one target column in `tasks`")
        bad = [t for t in tasks if not t.isidentifier()]
        if bad:
            raise ValueError(f"target columns {bad} are task names and must be Python identifiers; rename them")
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.tasks = list(tasks)
        self.features = None if features is None else list(features)
        self.classification = None if classification is None else list(classification)
        self.split_column = split_column
        self.fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        self.normalize = bool(normalize)
        self.classes: dict[str, list] = {}
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self._loaded: tuple | None = None

    def _load(self) -> tuple:
        if self._loaded is not None:
            return self._loaded
        check_data_path(
            self.root, "TabularMultiTask", "expected a .csv file with a header row (or a .parquet file) at that path"
        )
        table = read_table(self.root)
        missing = [c for c in [*self.tasks, *(self.features or []), *([self.split_column] if self.split_column else [])]
                   if c not in table]  # fmt: skip
        if missing:
            raise ValueError(f"{self.root} has no column(s) {missing}; its columns are: {', '.join(table)}")
        feature_names = self.features or [c for c in table if c not in self.tasks and c != self.split_column]
        if not feature_names:
            raise ValueError(f"{self.root}: no feature columns left besides the targets")
        x = np.stack([_to_float(c, table[c]) for c in feature_names], 1)
        targets, sizes = {}, {}
        for task in self.tasks:
            values = table[task]
            is_class = task in self.classification if self.classification is not None else (
                _is_integral(values) or not _is_numeric(values)
            )  # fmt: skip
            if is_class:
                present = sorted({v for v in values if not _is_missing(v)}, key=_sort_key)
                self.classes[task] = present
                index = {v: i for i, v in enumerate(present)}
                targets[task] = torch.tensor([MISSING_LABEL if _is_missing(v) else index[v] for v in values])
                sizes[task] = len(present)
            else:
                targets[task] = torch.from_numpy(_to_float(task, values))
                sizes[task] = 1
        self._loaded = (feature_names, x, targets, sizes, table)
        return self._loaded

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        """Classes of each classification task; 1 (one output) for regression tasks."""
        return dict(self._load()[3])

    @property
    def input_shape(self) -> tuple[int]:
        return (len(self._load()[0]),)

    def _build(self) -> None:
        feature_names, x, targets, _, table = self._load()
        n = len(x)
        if self.split_column:
            column = [str(v).strip().lower() for v in table[self.split_column]]
            unknown = sorted(set(column) - {"train", "val", "test"})
            if unknown:
                raise ValueError(f"split column {self.split_column!r} holds {unknown}; use train, val or test")
            parts = {s: np.array([i for i, v in enumerate(column) if v == s], dtype=np.int64)
                     for s in ("train", "val", "test")}  # fmt: skip
        else:
            parts = split_indices(n, self.fractions, np.random.default_rng(self.seed))
        train = parts["train"]
        mean = np.nanmean(x[train], 0) if len(train) else np.zeros(x.shape[1], dtype=np.float32)
        mean = np.nan_to_num(mean)
        x = np.where(np.isnan(x), mean[None], x).astype(np.float32)
        inputs = torch.from_numpy(x)
        if self.normalize:
            self.mean = inputs[torch.from_numpy(train)].mean(0)
            self.std = inputs[torch.from_numpy(train)].std(0).nan_to_num(1.0).clamp_min(1e-6)
            inputs = (inputs - self.mean) / self.std
        sets = {}
        for split, rows in parts.items():
            rows_t = torch.from_numpy(rows)
            sets[split] = TensorMultiTaskDataset(inputs[rows_t], {t: v[rows_t] for t, v in targets.items()})
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]


def _is_numeric(values: list) -> bool:
    try:
        for v in values:
            if not _is_missing(v):
                float(v)
    except ValueError:
        return False
    return True


def _sort_key(value: Any) -> tuple:
    try:
        return (0, float(value), "")  # numbers in numeric order
    except (TypeError, ValueError):
        return (1, 0.0, str(value))
