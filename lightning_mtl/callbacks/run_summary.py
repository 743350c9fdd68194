"""Leave a self-contained summary of every run in its folder, whatever the logger."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger


def run_folder(trainer: pl.Trainer) -> Path:
    """The folder of this run: a W&B run's own folder (``wandb/<run>/``, since W&B's ``save_dir`` is shared
    by all its runs), else the logger's ``log_dir`` (``<save_dir>/<name>/version_<n>/``), else the
    trainer's ``default_root_dir``."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return Path(logger.experiment.dir).parent  # <run>/files holds what W&B uploads
    return Path(trainer.log_dir or trainer.default_root_dir)


def write_json_atomically(path: Path, content: Any) -> None:
    """Write to a temporary file beside ``path``, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunSummary(pl.Callback):
    """Writes ``run_summary.json`` into the run's folder at the end of validation, fit and test.

    It holds ``metrics`` (the last value of every logged metric, fit and test merged), ``best`` (the
    ``best/<key>`` values of a :class:`~lightning_mtl.callbacks.BestMetricsSummary` in the trainer) and
    ``config`` (what the run was; the CLI gives the key facts of the resolved config). ``python -m
    lightning_mtl report`` reads it; W&B offline runs and TensorBoard event files give the report nothing
    it can read without this file. The file is rewritten whole each time (atomically), so a run that
    stops early still leaves its last state; nothing needs to survive a restart (the metrics come
    from the run, the best values from the checkpointed ``BestMetricsSummary``).

    Args:
        config: JSON-serializable facts about the run, written as they are.
        filename: the file's name inside the run folder.
    """

    def __init__(self, config: dict[str, Any] | None = None, filename: str = "run_summary.json") -> None:
        self.config = dict(config or {})
        self.filename = filename
        self.metrics: dict[str, float] = {}

    def _write(self, trainer: pl.Trainer) -> None:
        for key, tensor in trainer.callback_metrics.items():
            value = float(tensor)
            if math.isfinite(value):  # JSON has no NaN
                self.metrics[key] = value
        if not trainer.is_global_zero or trainer.sanity_checking or not self.metrics:
            return
        best: dict[str, float] = {}
        for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
            best.update({f"best/{k}": float(v) for k, v in (getattr(callback, "best", None) or {}).items()})
        summary = {"metrics": self.metrics, "best": best, "config": self.config}
        write_json_atomically(run_folder(trainer) / self.filename, summary)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)
