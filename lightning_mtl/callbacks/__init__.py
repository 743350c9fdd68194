"""Callbacks that any Lightning project can use."""

from lightning_mtl.callbacks.anytime import AnytimeEvaluation
from lightning_mtl.callbacks.best_metrics import BestMetricsSummary
from lightning_mtl.callbacks.ema import EMATeacher, ema_decay
from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor
from lightning_mtl.callbacks.knn import KNNMonitor, weighted_knn_predict
from lightning_mtl.callbacks.linear_probe import OnlineLinearProbe
from lightning_mtl.callbacks.prediction_writer import TaskPredictionWriter
from lightning_mtl.callbacks.run_summary import RunSummary, run_folder

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
