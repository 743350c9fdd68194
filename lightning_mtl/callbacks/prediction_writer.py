"""Write what ``predict`` returns to a file in the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_mtl.callbacks.run_summary import run_folder


def _concat(parts: list[Any]) -> Any:
    """Batches of outputs -> one output: tensors concatenated along the batch, dicts per key, else a list."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts])
    if isinstance(first, dict):
        return {key: _concat([p[key] for p in parts]) for key in first}
    return parts


class TaskPredictionWriter(BasePredictionWriter):
    """Saves the predictions of a ``predict`` run as ``predictions.pt`` in the run folder.

    The file holds ``{"predictions": ..., "indices": LongTensor}``: for a
    :class:`~lightning_mtl.multitask.MultiTaskModule` a dict ``{task: tensor}`` (the heads' outputs, one
    row per sample), for other modules their ``predict_step`` outputs concatenated; ``indices`` are the
    samples' positions in the predict dataset (``None`` where the loader's sampler does not allow them).
    With several predict dataloaders the file holds a list of such dicts, one per loader; with several
    processes each writes ``predictions-rank<k>.pt`` (indices say where each row belongs).

    Args:
        filename: the file's name inside the run folder (``run_folder``: the logger's ``log_dir``, a W&B
            run's own folder, else ``default_root_dir``).
    """

    def __init__(self, filename: str = "predictions.pt") -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.filename = filename
        self._outputs: dict[int, list[Any]] = {}
        self._indices: dict[int, list[Sequence[int] | None]] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs, self._indices = {}, {}

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        detached = apply_to_collection(prediction, torch.Tensor, lambda t: t.detach().cpu())
        self._outputs.setdefault(dataloader_idx, []).append(detached)
        self._indices.setdefault(dataloader_idx, []).append(batch_indices)

    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        per_loader = []
        for loader in sorted(self._outputs):
            indices = self._indices[loader]
            known = all(i is not None for i in indices)
            per_loader.append({
                "predictions": _concat(self._outputs[loader]),
                "indices": torch.tensor([j for i in indices for j in i], dtype=torch.long) if known else None,  # type: ignore[union-attr]
            })  # fmt: skip
        if not per_loader:
            return
        name = self.filename
        if trainer.world_size > 1:
            stem, suffix = Path(name).stem, Path(name).suffix
            name = f"{stem}-rank{trainer.global_rank}{suffix}"
        path = run_folder(trainer) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(per_loader[0] if len(per_loader) == 1 else per_loader, path)
        self._outputs, self._indices = {}, {}
