"""Mixing data augmentation: batch mixes (Mixup, CutMix, ResizeMix, a 3-sample linear mix) with the
soft-target cross-entropy and a Callback that applies them, and AdAutoMix / AutoMix (a mask generator
on an EMA teacher's features) as a LightningModule."""

from lightning_mtl.mixup._base import BatchMix, MixedBatch, mix_targets
from lightning_mtl.mixup.adautomix import AdAutoMix, AutoMix
from lightning_mtl.mixup.callback import MixBatch, hard_labels
from lightning_mtl.mixup.cutmix import CutMix
from lightning_mtl.mixup.generator import MixMaskGenerator
from lightning_mtl.mixup.linear3 import ThreeSampleMixup
from lightning_mtl.mixup.losses import soft_target_cross_entropy
from lightning_mtl.mixup.mixup import Mixup
from lightning_mtl.mixup.resizemix import ResizeMix
from lightning_mtl.mixup.visualize import log_mixed_grid

__all__ = [
    "AdAutoMix",
    "AutoMix",
    "BatchMix",
    "CutMix",
    "MixBatch",
    "MixMaskGenerator",
    "MixedBatch",
    "Mixup",
    "ResizeMix",
    "ThreeSampleMixup",
    "hard_labels",
    "log_mixed_grid",
    "mix_targets",
    "soft_target_cross_entropy",
]
