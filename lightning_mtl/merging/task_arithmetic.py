"""Task arithmetic: add (or, with a negative coefficient, subtract) task vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_mtl.merging.registry import Merge, register_merge
from lightning_mtl.merging.task_vector import TaskVector

__all__ = ["TaskArithmetic"]


@register_merge("task_arithmetic", "ta", "sum")
class TaskArithmetic(Merge):
    """Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):
    ``tau_m = sum_t tau_t`` and ``theta = theta_0 + lambda * tau_m``.

    A negative coefficient is task negation (``theta_0 - lambda * tau``: forget a task). The authors
    pick one ``lambda`` on validation data (the TIES repository's grid 0.1..1.0; 0.3 a common default),
    which :func:`~lightning_mtl.merging.search_coefficient` does.
    """

    default_coef = 0.3

    def merge(self, vectors: Sequence[Mapping[str, Tensor]]) -> TaskVector:
        out = {key: torch.zeros(value.shape, dtype=torch.float32) for key, value in vectors[0].items()}
        for vector in vectors:
            for key, acc in out.items():
                acc.add_(vector[key].to(torch.float32))
        return TaskVector._wrap(out, torch.float32)
