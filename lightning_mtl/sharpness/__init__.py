"""Sharpness-aware training: SAM / ASAM as an optimizer wrapper and as a drop-in Lightning callback, and
the public perturbation API they share (:mod:`lightning_mtl.sharpness.perturb`). F-MTL, the multi-task
form, lives beside the gradient engine in :mod:`lightning_mtl.multitask.fmtl`; ``FMTL`` is re-exported
here on first use, so that this package never imports ``multitask``."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_mtl.sharpness.callback import SharpnessAwareMinimization
from lightning_mtl.sharpness.perturb import (
    apply_perturbation,
    perturbation_norm,
    restore_parameters,
    sam_perturbation,
)
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


def __getattr__(name: str) -> Any:
    # the multi-task family sits above this one: load it only when FMTL is asked for
    if name == "FMTL":
        return importlib.import_module("lightning_mtl.multitask.fmtl").FMTL
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
