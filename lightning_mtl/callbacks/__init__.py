"""Callbacks that any Lightning project can use."""

from lightning_mtl.callbacks.best_metrics import BestMetricsSummary
from lightning_mtl.callbacks.gradient_conflict import GradientConflictMonitor

__all__ = ["BestMetricsSummary", "GradientConflictMonitor"]
