"""Callbacks that any Lightning project can use."""

from lightning_mtl.callbacks.best_metrics import BestMetricsSummary

__all__ = ["BestMetricsSummary"]
