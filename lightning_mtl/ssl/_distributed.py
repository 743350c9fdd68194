"""Moved to :mod:`lightning_mtl._distributed` (shared by every family); kept so old imports still work."""

from lightning_mtl._distributed import (
    differentiable_sum,
    distributed_world_size,
    gather_rows,
    max_over_ranks,
    sum_over_ranks,
)

__all__ = ["differentiable_sum", "distributed_world_size", "gather_rows", "max_over_ranks", "sum_over_ranks"]
