"""Your own multi-task data from one ``.npz`` file."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.datamodules._common import (
    TensorMultiTaskDataset,
    _TensorDataModule,
    check_data_path,
    read_npz,
    split_indices,
)

__all__ = ["NpzMultiTaskDataModule"]


class NpzMultiTaskDataModule(_TensorDataModule):
    """Multi-task data from a ``.npz`` file (as written by ``numpy.savez``), split by a seed.

    The file holds one inputs array (key ``inputs_key``, default ``"inputs"``) and one array per task
    (keys given by ``tasks``); all other keys are ignored. For example::

        np.savez("data.npz", inputs=x, left=y_left, right=y_right)   # x: [N, C, H, W], y: [N]
        dm = NpzMultiTaskDataModule("data.npz", tasks=["left", "right"])

    Inputs: ``[N, C, H, W]`` is used as is, ``[N, H, W]`` gets a channel axis, ``[N, H, W, C]`` is
    transposed when ``channels_last=True``; ``[N, D]`` feature vectors are kept as they are (the
    model then has to take ``[B, D]``). ``uint8`` inputs are divided by 255; everything becomes
    float32. If ``normalize``, inputs are standardized per channel (per feature for ``[N, D]``)
    with the training split's statistics (attributes :attr:`mean` / :attr:`std` after loading).

    Targets: integer (or bool) arrays are classification labels (``torch.long``) and
    ``num_classes[task]`` is ``max + 1``; floating arrays are regression targets (float32) and
    ``num_classes[task]`` is the number of outputs per sample (1 for ``[N]``). ``task_types`` tells
    which is which.

    The rows are split into disjoint train / val / test parts, seeded by ``seed``, with
    ``val_fraction`` and ``test_fraction`` of the rows (rounded); train takes the rest. The file is
    read lazily, at the first access to ``task_names`` / ``num_classes`` / ``input_shape`` or in
    ``setup``.

    Args:
        path: the ``.npz`` file.
        tasks: keys of the task arrays; they are also the task names.
        inputs_key: key of the inputs array.
        val_fraction: share of the rows used for validation.
        test_fraction: share of the rows used for testing.
        channels_last: the inputs are ``[N, H, W, C]`` and must be transposed.
        normalize: standardize inputs with training statistics.
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the split and of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        path: str,
        tasks: list[str],
        inputs_key: str = "inputs",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        channels_last: bool = False,
        normalize: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = [str(t) for t in tasks]
        if not tasks:
            raise ValueError("NpzMultiTaskDataModule needs at least one task key in `tasks`")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in `tasks`: {tasks}")
        if inputs_key in tasks:
            raise ValueError(f"the inputs key {inputs_key!r} cannot also be a task")
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"need val_fraction >= 0, test_fraction >= 0 and val_fraction + test_fraction < 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        self.path = os.fspath(path)
        self.tasks = tasks
        self.inputs_key = str(inputs_key)
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.channels_last = bool(channels_last)
        self.normalize = bool(normalize)
        self.split_rows: dict[str, np.ndarray] = {}
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._inputs: Tensor | None = None
        self._targets: dict[str, Tensor] = {}
        self._num_classes: dict[str, int] = {}
        self.task_types: dict[str, str] = {}
        self.save_hyperparameters()

    # --- loading ----------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._inputs is not None:
            return
        check_data_path(
            self.path,
            type(self).__name__,
            f"expected a .npz file (numpy.savez) holding an array '{self.inputs_key}' of shape "
            f"[N, C, H, W] and one array of length N per task ({', '.join(self.tasks)})",
        )
        arrays, files = read_npz(self.path, [self.inputs_key, *self.tasks])
        for key in [self.inputs_key, *self.tasks]:
            if key not in arrays:
                what = "inputs" if key == self.inputs_key else "task"
                raise KeyError(f"{what} key '{key}' not found in {self.path}; available keys: {sorted(files)}")
        inputs = arrays[self.inputs_key]
        targets = {task: arrays[task] for task in self.tasks}

        n = len(inputs)
        for task, values in targets.items():
            if values.ndim == 0 or len(values) != n:
                rows = "a scalar" if values.ndim == 0 else f"{len(values)} rows"
                raise ValueError(
                    f"array '{task}' has {rows} but inputs array '{self.inputs_key}' has {n} rows in {self.path}"
                )
        self._inputs = self._convert_inputs(inputs)
        for task, values in targets.items():
            if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.integer):
                self._targets[task] = torch.from_numpy(values.astype(np.int64))
                self.task_types[task] = "classification"
                self._num_classes[task] = int(values.max()) + 1 if values.size else 0
            elif np.issubdtype(values.dtype, np.floating):
                self._targets[task] = torch.from_numpy(values.astype(np.float32))
                self.task_types[task] = "regression"
                self._num_classes[task] = int(np.prod(values.shape[1:], dtype=np.int64))
            else:
                raise TypeError(f"array '{task}' in {self.path} has unsupported dtype {values.dtype}")

    def _convert_inputs(self, inputs: np.ndarray) -> Tensor:
        if not (np.issubdtype(inputs.dtype, np.number) or inputs.dtype == np.bool_):
            raise TypeError(f"inputs array '{self.inputs_key}' in {self.path} has unsupported dtype {inputs.dtype}")
        scale = 1.0 / 255.0 if inputs.dtype == np.uint8 else 1.0
        x = torch.from_numpy(inputs.astype(np.float32) * np.float32(scale))
        if self.channels_last:
            if x.ndim != 4:
                raise ValueError(f"channels_last=True needs inputs [N, H, W, C], got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2)
        elif x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim not in (2, 4):
            raise ValueError(
                f"inputs array '{self.inputs_key}' must be [N, C, H, W], [N, H, W] or [N, D], "
                f"got shape {tuple(x.shape)}"
            )
        return x.contiguous()

    # --- metadata ---------------------------------------------------------------------------------
    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @property
    def num_classes(self) -> dict[str, int]:
        self._load()
        return dict(self._num_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        self._load()
        assert self._inputs is not None
        return tuple(self._inputs.shape[1:])

    # --- datasets ---------------------------------------------------------------------------------
    def _build(self) -> None:
        self._load()
        x = self._inputs
        assert x is not None
        fractions = (1.0 - self.val_fraction - self.test_fraction, self.val_fraction, self.test_fraction)
        self.split_rows = split_indices(len(x), fractions, np.random.default_rng(self.seed))
        if self.normalize:
            train = x[torch.from_numpy(self.split_rows["train"])]
            dims = [d for d in range(train.ndim) if d != 1]
            shape = [1, -1] + [1] * (train.ndim - 2)
            self.mean = train.mean(dim=dims).reshape(shape)
            self.std = train.std(dim=dims, correction=0).clamp_min(1e-8).reshape(shape)
            x = (x - self.mean) / self.std
        datasets = {}
        for split, rows in self.split_rows.items():
            idx = torch.from_numpy(rows)
            datasets[split] = TensorMultiTaskDataset(x[idx], {t: v[idx] for t, v in self._targets.items()})
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]
