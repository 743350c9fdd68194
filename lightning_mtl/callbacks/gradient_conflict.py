"""The gradient conflict monitor moved to :mod:`lightning_mtl.multitask.gradient_conflict`, beside the
gradient engine whose Jacobian it reads; this old path re-exports it."""

from lightning_mtl.multitask.gradient_conflict import (
    GradientConflictMonitor,
    conflict_figure,
    conflict_image,
    heatmap,
)

__all__ = ["GradientConflictMonitor", "conflict_figure", "conflict_image", "heatmap"]
