"""The old private path of :mod:`lightning_mtl.sharpness.perturb`, the public perturbation API."""

from lightning_mtl.sharpness.perturb import (
    adaptive_scale,
    apply_perturbation,
    perturbation_norm,
    restore_parameters,
    sam_perturbation,
)

__all__ = ["adaptive_scale", "apply_perturbation", "perturbation_norm", "restore_parameters", "sam_perturbation"]
