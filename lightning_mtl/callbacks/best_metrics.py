"""Track the best value of validation metrics and put it in the loggers' run summaries."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric, MetricCollection

_MODES = ("min", "max")


class BestMetricsSummary(pl.Callback):
    """Keeps ``best/<key>`` for the monitored validation metrics and hands it to the loggers.

    Which keys: the ``monitor`` keys, or, without ``monitor``, every logged key that starts with
    ``prefix``. Whether higher is better, first found wins: ``mode`` (as in Lightning's
    ``ModelCheckpoint``: ``"min"`` / ``"max"`` for every key, or ``{key: "min" | "max"}``); the module's
    ``metric_directions`` (``{key: higher is better}``, which the library's modules fill); the
    ``higher_is_better`` of a torchmetrics ``Metric`` logged under that key with ``self.log``, or of a
    ``MetricCollection`` on the module whose prefixed name is the key. A key with none of these warns
    once and counts as lower-is-better (losses, errors).

    Where the best values go: a ``WandbLogger``'s run summary; every other logger (CSV, TensorBoard)
    gets them as ``best/<key>`` metrics whenever one improves (columns of ``metrics.csv``). Without a
    logger they stay in :attr:`best`. They are kept in this callback's state, so a resumed run
    continues from them.

    Args:
        monitor: the key or keys to track; ``None`` tracks every key starting with ``prefix``.
        mode: ``"min"`` / ``"max"`` for all tracked keys, a ``{key: "min" | "max"}`` dict, or ``None``
            to take each key's direction from the module and its torchmetrics objects.
        prefix: without ``monitor``, only keys starting with this are tracked.
    """

    def __init__(
        self,
        monitor: str | list[str] | None = None,
        mode: Literal["min", "max"] | dict[str, Literal["min", "max"]] | None = None,
        prefix: str = "val/",
    ) -> None:
        modes = mode.values() if isinstance(mode, dict) else [] if mode is None else [mode]
        bad = [m for m in modes if m not in _MODES]
        if bad:
            raise ValueError(f"BestMetricsSummary mode must be 'min' or 'max' (or a dict of them), got {bad[0]!r}")
        self.monitor = [monitor] if isinstance(monitor, str) else None if monitor is None else list(monitor)
        self.mode = dict(mode) if isinstance(mode, dict) else mode
        self.prefix = prefix
        self.best: dict[str, float] = {}
        self._warned: set[str] = set()

    # -- which keys, which way -------------------------------------------------------------------
    def _tracked(self, metrics: dict[str, Any]) -> list[str]:
        if self.monitor is None:
            return [key for key in metrics if key.startswith(self.prefix)]
        missing = [key for key in self.monitor if key not in metrics and key not in self._warned]
        for key in missing:
            self._warned.add(key)
            rank_zero_warn(
                f"BestMetricsSummary monitors {key!r}, but no validation has logged it yet; the logged keys "
                f"are: {', '.join(sorted(metrics)) or '(none)'}"
            )
        return [key for key in self.monitor if key in metrics]

    def _higher_is_better(self, key: str, directions: dict[str, bool], logged: dict[str, Metric]) -> bool:
        if isinstance(self.mode, str):
            return self.mode == "max"
        if isinstance(self.mode, dict) and key in self.mode:
            return self.mode[key] == "max"
        if key in directions:
            return bool(directions[key])
        higher = getattr(logged.get(key), "higher_is_better", None)
        if higher is not None:
            return bool(higher)
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(
                f"BestMetricsSummary does not know whether {key!r} is better higher or lower (no `mode` names "
                "it, the module's `metric_directions` does not, and it was not logged from a torchmetrics "
                f"Metric with `higher_is_better`); assuming lower is better. Say which with "
                f"BestMetricsSummary(mode={{{key!r}: 'max'}}) (or 'min'; --best_metrics.mode on the command line)"
            )
        return False

    # -- hooks ---------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        directions = getattr(pl_module, "metric_directions", None) or {}
        logged = {} if isinstance(self.mode, str) else _logged_metric_objects(trainer, pl_module)
        changed = {}
        for key in self._tracked(metrics):
            value = float(metrics[key])
            if math.isnan(value):
                continue
            higher = self._higher_is_better(key, directions, logged)
            old = self.best.get(key)
            if old is None or (value > old if higher else value < old):
                self.best[key] = value
                changed[f"best/{key}"] = value
        if changed and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(changed)
                else:
                    logger.log_metrics(changed, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))


def _logged_metric_objects(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Metric]:
    """The torchmetrics objects behind logged keys: the prefixed names of the module's MetricCollections
    (``self.log_dict(collection.compute())``), then the Metric objects passed to ``self.log`` in this
    validation and the training epoch, which Lightning keeps in its (private) result collections."""
    found: dict[str, Metric] = {}
    for module in pl_module.modules():
        if isinstance(module, MetricCollection):
            found.update(module.items(keep_base=False, copy_state=False))
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    for results in (getattr(epoch_loop, "_results", None), getattr(trainer, "_results", None)):
        for result in results.values() if isinstance(results, dict) else ():
            value, meta = getattr(result, "value", None), getattr(result, "meta", None)
            if not isinstance(value, Metric) or meta is None:
                continue
            index = meta.dataloader_idx if meta.add_dataloader_idx else None
            suffix = "" if index is None else f"/dataloader_idx_{index}"
            for on_step in (False, True):  # "<name>", or "<name>_epoch" / "<name>_step" when logged both ways
                found[meta.forked_name(on_step) + suffix] = value
            found[meta.name + suffix] = value
    return found
