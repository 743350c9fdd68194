"""Sharpness-aware training: SAM / ASAM as an optimizer wrapper and as a drop-in Lightning callback,
F-MTL for multi-task models, and the perturbation math they share (``_perturb``)."""

from lightning_mtl.sharpness._perturb import (
    apply_perturbation,
    perturbation_norm,
    restore_parameters,
    sam_perturbation,
)
from lightning_mtl.sharpness.callback import SharpnessAwareMinimization
from lightning_mtl.sharpness.fmtl import FMTL
from lightning_mtl.sharpness.sam import SAM
from lightning_mtl.sharpness.schedule import RhoSchedule

__all__ = [
    "FMTL",
    "SAM",
    "RhoSchedule",
    "SharpnessAwareMinimization",
    "apply_perturbation",
    "perturbation_norm",
    "restore_parameters",
    "sam_perturbation",
]
