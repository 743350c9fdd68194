"""lightning_mtl: multi-task and related training methods as composable PyTorch Lightning plugins.

Importing the package is cheap: it loads no method family until one of its names is used
(``lightning_mtl.MultiTaskModule`` imports ``lightning_mtl.multitask``, and so on). Configs that
name classes by their short names (``MultiTaskModule``, ``MultiDigits``, ``ClassificationTask``,
``DigitsCNN``, ...) work through the command line, ``python -m lightning_mtl``, which imports every
family (:func:`import_families`) before it parses; a custom ``LightningCLI`` calls that function
first to get the same short names.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__version__ = "0.1.0"

# the packages above floor 0; `lightning_mtl.multitask` and the like work without an explicit import,
# as they did when this module imported them all
_SUBPACKAGES = (
    "lightning_mtl.aggregators",
    "lightning_mtl.architectures",
    "lightning_mtl.callbacks",
    "lightning_mtl.continual",
    "lightning_mtl.controllable",
    "lightning_mtl.datamodules",
    "lightning_mtl.embeddings",
    "lightning_mtl.finetuning",
    "lightning_mtl.merging",
    "lightning_mtl.mixup",
    "lightning_mtl.multitask",
    "lightning_mtl.selection",
    "lightning_mtl.sharpness",
    "lightning_mtl.ssl",
)

# public name -> the package that exports it, imported on first access
_LAZY = {
    # lightning_mtl.aggregators
    "create_aggregator": "lightning_mtl.aggregators",
    "list_aggregators": "lightning_mtl.aggregators",
    # lightning_mtl.architectures
    "CGC": "lightning_mtl.architectures",
    "CrossStitch": "lightning_mtl.architectures",
    "DeepLabHead": "lightning_mtl.architectures",
    "DigitsCNN": "lightning_mtl.architectures",
    "HardParameterSharing": "lightning_mtl.architectures",
    "MMoE": "lightning_mtl.architectures",
    "MTAN": "lightning_mtl.architectures",
    "MultiLeNet": "lightning_mtl.architectures",
    "PLE": "lightning_mtl.architectures",
    "PreActResNet18": "lightning_mtl.architectures",
    "ResNet18": "lightning_mtl.architectures",
    "ResNetDilated": "lightning_mtl.architectures",
    "SegNet": "lightning_mtl.architectures",
    "timm_encoder": "lightning_mtl.architectures",
    "TimmEncoder": "lightning_mtl.architectures",
    "TransformersEncoder": "lightning_mtl.architectures",
    # lightning_mtl.callbacks
    "BestMetricsSummary": "lightning_mtl.callbacks",
    "EMATeacher": "lightning_mtl.callbacks",
    "GradientConflictMonitor": "lightning_mtl.callbacks",
    "RunSummary": "lightning_mtl.callbacks",
    "TaskPredictionWriter": "lightning_mtl.callbacks",
    # lightning_mtl.continual
    "AnytimeEvaluation": "lightning_mtl.continual",
    "DualPrompt": "lightning_mtl.continual",
    "ER": "lightning_mtl.continual",
    "L2P": "lightning_mtl.continual",
    "LinearBaseline": "lightning_mtl.continual",
    "MVP": "lightning_mtl.continual",
    "OnePrompt": "lightning_mtl.continual",
    "SiBlurryStream": "lightning_mtl.continual",
    "VirtualOutlierRegularization": "lightning_mtl.continual",
    "ViTEvalTransform": "lightning_mtl.continual",
    "ViTTrainTransform": "lightning_mtl.continual",
    # lightning_mtl.controllable
    "BudgetSearch": "lightning_mtl.controllable",
    "ControllabilityEvaluation": "lightning_mtl.controllable",
    "ControllableMultiTaskModule": "lightning_mtl.controllable",
    "SlimmableDeepLabHead": "lightning_mtl.controllable",
    "SlimmableDigitsCNN": "lightning_mtl.controllable",
    "SlimmableResNet18": "lightning_mtl.controllable",
    "SlimmableResNetDilated": "lightning_mtl.controllable",
    # lightning_mtl.datamodules
    "CelebA": "lightning_mtl.datamodules",
    "CIFAR10": "lightning_mtl.datamodules",
    "CIFAR100": "lightning_mtl.datamodules",
    "Cityscapes": "lightning_mtl.datamodules",
    "Digits": "lightning_mtl.datamodules",
    "DigitsTasks": "lightning_mtl.datamodules",
    "ImageNetR": "lightning_mtl.datamodules",
    "MultiDigits": "lightning_mtl.datamodules",
    "MultiMNIST": "lightning_mtl.datamodules",
    "NpzMultiTaskDataModule": "lightning_mtl.datamodules",
    "NYUv2": "lightning_mtl.datamodules",
    "STL10": "lightning_mtl.datamodules",
    "TabularMultiTask": "lightning_mtl.datamodules",
    "TextMultiTask": "lightning_mtl.datamodules",
    "TinyImageNet": "lightning_mtl.datamodules",
    # lightning_mtl.embeddings
    "BeirPairsDataModule": "lightning_mtl.embeddings",
    "BiEncoder": "lightning_mtl.embeddings",
    "DistilledSentenceEmbedding": "lightning_mtl.embeddings",
    "moe_surgery": "lightning_mtl.embeddings",
    "PairClassificationEvaluation": "lightning_mtl.embeddings",
    "PairsDataModule": "lightning_mtl.embeddings",
    "RetrievalEvaluation": "lightning_mtl.embeddings",
    "ScoredPairsDataModule": "lightning_mtl.embeddings",
    # lightning_mtl.finetuning
    "load_intervention": "lightning_mtl.finetuning",
    "LoFiT": "lightning_mtl.finetuning",
    "LoFiTIntervention": "lightning_mtl.finetuning",
    "PreferencePairs": "lightning_mtl.finetuning",
    "SupConLoss": "lightning_mtl.finetuning",
    "supervised_contrastive_loss": "lightning_mtl.finetuning",
    "MultiLabelText": "lightning_mtl.finetuning",
    "PromptTunedClassifier": "lightning_mtl.finetuning",
    "EDA": "lightning_mtl.finetuning",
    "FewShotText": "lightning_mtl.finetuning",
    "PEFTClassifier": "lightning_mtl.finetuning",
    "LEVI": "lightning_mtl.finetuning",
    "LEVIFeatureCache": "lightning_mtl.finetuning",
    # lightning_mtl.merging
    "create_merge": "lightning_mtl.merging",
    "list_merges": "lightning_mtl.merging",
    "search_coefficient": "lightning_mtl.merging",
    "SelfPositioning": "lightning_mtl.merging",
    "TaskArithmetic": "lightning_mtl.merging",
    "TaskVector": "lightning_mtl.merging",
    "TIES": "lightning_mtl.merging",
    "WeightAveraging": "lightning_mtl.merging",
    # lightning_mtl.mixup
    "AdAutoMix": "lightning_mtl.mixup",
    "AutoMix": "lightning_mtl.mixup",
    "CutMix": "lightning_mtl.mixup",
    "MixBatch": "lightning_mtl.mixup",
    "Mixup": "lightning_mtl.mixup",
    "ResizeMix": "lightning_mtl.mixup",
    "ThreeSampleMixup": "lightning_mtl.mixup",
    # lightning_mtl.multitask
    "BinaryTask": "lightning_mtl.multitask",
    "ClassificationTask": "lightning_mtl.multitask",
    "delta_m": "lightning_mtl.multitask",
    "DepthTask": "lightning_mtl.multitask",
    "MISSING_LABEL": "lightning_mtl.multitask",
    "MultiLabelTask": "lightning_mtl.multitask",
    "MultiTaskModule": "lightning_mtl.multitask",
    "RegressionTask": "lightning_mtl.multitask",
    "SegmentationTask": "lightning_mtl.multitask",
    "SurfaceNormalTask": "lightning_mtl.multitask",
    "Task": "lightning_mtl.multitask",
    # lightning_mtl.selection
    "ActiveSourceSelection": "lightning_mtl.selection",
    "ByteLM": "lightning_mtl.selection",
    "CompressionSelected": "lightning_mtl.selection",
    "CompressionSelector": "lightning_mtl.selection",
    "DigitsSources": "lightning_mtl.selection",
    "MultiTaskBatchSampler": "lightning_mtl.selection",
    "MultiTaskSampling": "lightning_mtl.selection",
    "SortingTasks": "lightning_mtl.selection",
    "SourceBudgetSampler": "lightning_mtl.selection",
    "StdlibCorpus": "lightning_mtl.selection",
    "TaskHintingTransformer": "lightning_mtl.selection",
    # lightning_mtl.sharpness
    "FMTL": "lightning_mtl.sharpness",
    "RhoSchedule": "lightning_mtl.sharpness",
    "SAM": "lightning_mtl.sharpness",
    "SharpnessAwareMinimization": "lightning_mtl.sharpness",
    # lightning_mtl.ssl
    "BarlowTwins": "lightning_mtl.ssl",
    "KNNMonitor": "lightning_mtl.ssl",
    "LinearEvaluation": "lightning_mtl.ssl",
    "MixedBarlowTwins": "lightning_mtl.ssl",
    "OnlineLinearProbe": "lightning_mtl.ssl",
    "SSLAugmentation": "lightning_mtl.ssl",
    "TwoViews": "lightning_mtl.ssl",
}

__all__ = [
    "ActiveSourceSelection",
    "AdAutoMix",
    "AnytimeEvaluation",
    "AutoMix",
    "BarlowTwins",
    "BeirPairsDataModule",
    "BestMetricsSummary",
    "BiEncoder",
    "BinaryTask",
    "BudgetSearch",
    "ByteLM",
    "CGC",
    "CIFAR10",
    "CIFAR100",
    "CelebA",
    "Cityscapes",
    "ClassificationTask",
    "CompressionSelected",
    "CompressionSelector",
    "ControllabilityEvaluation",
    "ControllableMultiTaskModule",
    "CrossStitch",
    "CutMix",
    "DeepLabHead",
    "DepthTask",
    "Digits",
    "DigitsCNN",
    "DigitsSources",
    "DigitsTasks",
    "DistilledSentenceEmbedding",
    "DualPrompt",
    "EDA",
    "EMATeacher",
    "ER",
    "FMTL",
    "FewShotText",
    "GradientConflictMonitor",
    "HardParameterSharing",
    "ImageNetR",
    "KNNMonitor",
    "L2P",
    "LEVI",
    "LEVIFeatureCache",
    "LinearBaseline",
    "LinearEvaluation",
    "LoFiT",
    "LoFiTIntervention",
    "MISSING_LABEL",
    "MMoE",
    "MTAN",
    "MVP",
    "MixBatch",
    "MixedBarlowTwins",
    "Mixup",
    "MultiDigits",
    "MultiLabelTask",
    "MultiLabelText",
    "MultiLeNet",
    "MultiMNIST",
    "MultiTaskBatchSampler",
    "MultiTaskModule",
    "MultiTaskSampling",
    "NYUv2",
    "NpzMultiTaskDataModule",
    "OnePrompt",
    "OnlineLinearProbe",
    "PEFTClassifier",
    "PLE",
    "PairClassificationEvaluation",
    "PairsDataModule",
    "PreActResNet18",
    "PreferencePairs",
    "PromptTunedClassifier",
    "RegressionTask",
    "ResNet18",
    "ResNetDilated",
    "ResizeMix",
    "RetrievalEvaluation",
    "RhoSchedule",
    "RunSummary",
    "SAM",
    "SSLAugmentation",
    "STL10",
    "ScoredPairsDataModule",
    "SegNet",
    "SegmentationTask",
    "SelfPositioning",
    "SharpnessAwareMinimization",
    "SiBlurryStream",
    "SlimmableDeepLabHead",
    "SlimmableDigitsCNN",
    "SlimmableResNet18",
    "SlimmableResNetDilated",
    "SortingTasks",
    "SourceBudgetSampler",
    "StdlibCorpus",
    "SupConLoss",
    "SurfaceNormalTask",
    "TIES",
    "TabularMultiTask",
    "Task",
    "TaskArithmetic",
    "TaskHintingTransformer",
    "TaskPredictionWriter",
    "TaskVector",
    "TextMultiTask",
    "ThreeSampleMixup",
    "TimmEncoder",
    "TinyImageNet",
    "TransformersEncoder",
    "TwoViews",
    "ViTEvalTransform",
    "ViTTrainTransform",
    "VirtualOutlierRegularization",
    "WeightAveraging",
    "__version__",
    "create_aggregator",
    "create_merge",
    "delta_m",
    "import_families",
    "list_aggregators",
    "list_merges",
    "load_intervention",
    "moe_surgery",
    "search_coefficient",
    "supervised_contrastive_loss",
    "timm_encoder",
]


def import_families() -> None:
    """Import every family and every public name, as ``import lightning_mtl`` did before it became lazy.

    jsonargparse (the Lightning CLI) resolves a short class name (``MultiTaskModule``, ``MultiDigits``,
    ``ClassificationTask``, ``GradientConflictMonitor``, ...) among the subclasses imported so far, so
    the command line calls this before it parses.
    """
    for package in _SUBPACKAGES:
        importlib.import_module(package)
    for name in __all__:  # the lazy re-exports too (the gradient-conflict monitor)
        getattr(sys.modules[__name__], name)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif f"{__name__}.{name}" in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {m.rsplit(".", 1)[1] for m in _SUBPACKAGES})
