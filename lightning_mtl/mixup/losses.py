"""Cross-entropy with soft (probability) targets; defined in :mod:`lightning_mtl._losses`, which the
multi-task family shares."""

from lightning_mtl._losses import soft_target_cross_entropy

__all__ = ["soft_target_cross_entropy"]
