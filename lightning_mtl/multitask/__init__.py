"""Multi-task module, task specifications and Delta m %."""

from lightning_mtl.multitask.delta_m import delta_m
from lightning_mtl.multitask.dense import DepthTask, SegmentationTask, SurfaceNormalTask
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
    "MultiLabelTask",
    "MultiTaskModule",
    "RegressionTask",
    "SegmentationTask",
    "SurfaceNormalTask",
    "Task",
    "TaskError",
    "delta_m",
]
