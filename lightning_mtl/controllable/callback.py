"""A callback that evaluates a trained controllable network over budgets and preferences at the end of fit."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_mtl.controllable.evaluation import controllability_grid, metric_choice, plot_controllability
from lightning_mtl.controllable.search import normalize_preference

__all__ = ["ControllabilityEvaluation"]


class ControllabilityEvaluation(pl.Callback):
    """After ``fit``: the budget search over a grid of budgets and preferences on the validation data, the
    controllability metric per budget, a JSON table and a PNG (budget vs. task metric, one line per preference).

    Runs on global rank zero (not under ``fast_dev_run``), over that rank's validation batches (its shard under DDP). Writes
    ``controllability.json`` and ``controllability.png`` into ``dirpath`` (default: the trainer's log
    directory, else its root directory); :attr:`results` keeps the grid.

    Args:
        preferences: preference vectors, one entry per task (normalized to sum to 1).
        budgets: fractions of the widest configuration's FLOPs.
        metric: the task metric to read: one name for every task (``"acc"`` for classification tasks) or one
            per task, e.g. ``{"segmentation": "miou", "depth": "abs_err", "normal": "mean_angle"}`` on NYUv2.
            Each counts in its own direction, the torchmetrics metric's ``higher_is_better``: an error that falls
            as its task's preference rises agrees with the preference.
        dirpath: where to write the table and the picture.
        higher_is_better: ``{task: bool}`` for a metric that does not say its direction (or to override it).
    """

    def __init__(
        self,
        preferences: Sequence[Sequence[float]] = ((0.9, 0.1), (0.7, 0.3), (0.5, 0.5), (0.3, 0.7), (0.1, 0.9)),
        budgets: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
        metric: str | dict[str, str] = "acc",
        dirpath: str | None = None,
        higher_is_better: dict[str, bool] | None = None,
    ) -> None:
        self.preferences = [list(p) for p in preferences]
        self.budgets = [float(b) for b in budgets]
        self.metric = metric if isinstance(metric, str) else dict(metric)
        self.dirpath = dirpath
        self.higher_is_better = None if higher_is_better is None else dict(higher_is_better)
        self.results: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a wrong metric name or preference fails before training, not after it
        if stage != "fit":
            return
        metric_choice(pl_module, self.metric, self.higher_is_better)
        for preference in self.preferences:
            normalize_preference(preference, pl_module.task_names)  # type: ignore[arg-type]  # a ControllableMultiTaskModule
        bad = [b for b in self.budgets if not 0 < b <= 1]
        if bad:
            raise ValueError(f"budgets are fractions of the widest network's FLOPs in (0, 1], got {bad}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a smoke run (fast_dev_run) writes nothing, like checkpointing
        if not trainer.is_global_zero or getattr(trainer, "fast_dev_run", False):
            return
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            raise ValueError("ControllabilityEvaluation needs validation data: the data module has no val_dataloader")
        batches = list(loader)
        self.results = controllability_grid(
            pl_module, batches, self.preferences, self.budgets, self.metric, higher_is_better=self.higher_is_better
        )
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        table = {**self.results, "controllability": {str(k): v for k, v in self.results["controllability"].items()}}
        (folder / "controllability.json").write_text(json.dumps(table, indent=1))
        plot_controllability(self.results, folder / "controllability.png", pl_module.task_names)  # type: ignore[arg-type]  # a ControllableMultiTaskModule
        per_budget = ", ".join(f"{b:g}: {v:+.2f}" for b, v in self.results["controllability"].items())
        print(f"controllability per budget {per_budget}; mean {self.results['mean_controllability']:+.3f}")
