"""Plain weight averaging of fine-tuned experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from lightning_mtl.merging.registry import Merge, register_merge
from lightning_mtl.merging.task_arithmetic import TaskArithmetic
from lightning_mtl.merging.task_vector import TaskVector

__all__ = ["WeightAveraging"]


@register_merge("averaging", "average", "mean")
class WeightAveraging(Merge):
    """Weight averaging of experts fine-tuned from one model (Wortsman et al., "Model soups", ICML 2022,
    the uniform soup): ``theta = mean_t theta_t = theta_0 + mean_t tau_t``.

    The merged vector is the mean task vector, so ``coef = 1`` (the default) is the average of the
    experts; other coefficients move along the same direction, as task arithmetic with ``lambda / T``.
    """

    default_coef = 1.0

    def merge(self, vectors: Sequence[Mapping[str, Tensor]]) -> TaskVector:
        total = TaskArithmetic().merge(vectors)  # a fresh float32 sum, scaled in place
        for value in total.values():
            value.div_(len(vectors))
        return total
