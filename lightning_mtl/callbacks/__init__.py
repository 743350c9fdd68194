"""Callbacks that any Lightning project can use.

The generic ones live here (:class:`EMATeacher`, :class:`BestMetricsSummary`, :class:`RunSummary`,
:class:`TaskPredictionWriter`) and import no method family. Each family owns its own callbacks
(:class:`~lightning_mtl.continual.AnytimeEvaluation`, :class:`~lightning_mtl.ssl.KNNMonitor`,
:class:`~lightning_mtl.ssl.OnlineLinearProbe`, the gradient-conflict monitor); they are re-exported
here lazily, so ``from lightning_mtl.callbacks import EMATeacher`` loads neither those families nor
their dependencies (timm, torchvision).
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_mtl.callbacks.best_metrics import BestMetricsSummary
from lightning_mtl.callbacks.ema import EMATeacher, ema_decay
from lightning_mtl.callbacks.prediction_writer import TaskPredictionWriter
from lightning_mtl.callbacks.run_summary import RunSummary, run_folder

# name -> the module that defines it, imported on first access
_LAZY = {
    "AnytimeEvaluation": "lightning_mtl.continual.anytime",
    "GradientConflictMonitor": "lightning_mtl.multitask.gradient_conflict",
    "KNNMonitor": "lightning_mtl.ssl.knn",
    "OnlineLinearProbe": "lightning_mtl.ssl.linear_probe",
    "weighted_knn_predict": "lightning_mtl.ssl.knn",
}

__all__ = [
    "AnytimeEvaluation",
    "BestMetricsSummary",
    "EMATeacher",
    "GradientConflictMonitor",
    "KNNMonitor",
    "OnlineLinearProbe",
    "RunSummary",
    "TaskPredictionWriter",
    "ema_decay",
    "run_folder",
    "weighted_knn_predict",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
