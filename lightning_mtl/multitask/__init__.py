"""Multi-task module, task specifications, the gradient engine, F-MTL, the gradient-conflict monitor and Delta m %."""

from lightning_mtl.multitask.delta_m import delta_m
from lightning_mtl.multitask.dense import DepthTask, SegmentationTask, SurfaceNormalTask
from lightning_mtl.multitask.engine import GradientEngine
from lightning_mtl.multitask.fmtl import FMTL
from lightning_mtl.multitask.gradient_conflict import GradientConflictMonitor
from lightning_mtl.multitask.module import MultiTaskModule
from lightning_mtl.multitask.tasks import (
    MISSING_LABEL,
    BinaryTask,
    ClassificationTask,
    MultiLabelTask,
    RegressionTask,
    Task,
    TaskError,
)

__all__ = [
    "MISSING_LABEL",
    "BinaryTask",
    "ClassificationTask",
    "DepthTask",
    "FMTL",
    "GradientConflictMonitor",
    "GradientEngine",
    "MultiLabelTask",
    "MultiTaskModule",
    "RegressionTask",
    "SegmentationTask",
    "SurfaceNormalTask",
    "Task",
    "TaskError",
    "delta_m",
]
