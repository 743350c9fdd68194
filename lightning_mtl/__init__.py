"""lightning_mtl: multi-task and related training methods as composable PyTorch Lightning plugins.

Importing the package registers the short class names that configs use (``MultiTaskModule``,
``MultiDigits``, ``ClassificationTask``, ``DigitsCNN``, ...).
"""

__version__ = "0.1.0"

from lightning_mtl.aggregators import create_aggregator, list_aggregators  # noqa: E402
from lightning_mtl.architectures import DigitsCNN, TimmEncoder, timm_encoder  # noqa: E402
from lightning_mtl.callbacks import BestMetricsSummary, GradientConflictMonitor  # noqa: E402
from lightning_mtl.datamodules import Digits, MultiDigits, NpzMultiTaskDataModule  # noqa: E402
from lightning_mtl.multitask import (  # noqa: E402
    MISSING_LABEL,
    BinaryTask,
    ClassificationTask,
    MultiLabelTask,
    MultiTaskModule,
    RegressionTask,
    Task,
    delta_m,
)

__all__ = [
    "MISSING_LABEL",
    "BestMetricsSummary",
    "BinaryTask",
    "ClassificationTask",
    "Digits",
    "DigitsCNN",
    "GradientConflictMonitor",
    "MultiDigits",
    "MultiLabelTask",
    "MultiTaskModule",
    "NpzMultiTaskDataModule",
    "RegressionTask",
    "Task",
    "TimmEncoder",
    "__version__",
    "create_aggregator",
    "delta_m",
    "list_aggregators",
    "timm_encoder",
]
