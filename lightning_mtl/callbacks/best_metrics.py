"""Track the best value of every validation metric and put it in the loggers' run summaries."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger


class BestMetricsSummary(pl.Callback):
    """Keeps ``best/<key>`` for every logged ``val/...`` metric and writes it to the W&B run summary.

    The direction of each metric comes from the module's ``metric_directions`` (``{key: higher is
    better}``, which :class:`~lightning_mtl.multitask.MultiTaskModule` fills from torchmetrics'
    ``higher_is_better``); keys it does not list count as lower-is-better (losses, errors). The best
    values are kept in this callback's state, so a resumed run continues from them.

    Args:
        prefix: only metrics whose key starts with this are tracked.
    """

    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        directions = getattr(pl_module, "metric_directions", {})
        changed = {}
        for key, value in trainer.callback_metrics.items():
            if not key.startswith(self.prefix):
                continue
            value = float(value)
            if math.isnan(value):
                continue
            higher = directions.get(key, False)
            old = self.best.get(key)
            if old is None or (value > old if higher else value < old):
                self.best[key] = value
                changed[f"best/{key}"] = value
        if changed and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(changed)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))
