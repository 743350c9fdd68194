"""Linear scalarization: a fixed weighted sum of the task losses.

The baseline every multi-task paper compares against; with all weights 1 it is "equal weighting"
(EW). See e.g. Xin et al., "Do Current Multi-Task Optimization Methods in Deep Learning Even
Help?", NeurIPS 2022, on how strong a tuned linear scalarization is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator


@register_aggregator("ls", "linear", "ew")
class LinearScalarization(LossWeighting):
    """``sum_i w_i l_i`` with fixed weights.

    Args:
        weights: one weight per task, in the order of the module's tasks; ``None`` gives 1 for every
            task (equal weighting).
    """

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.fixed = None if weights is None else [float(w) for w in weights]

    def weights(self, losses: Tensor) -> Tensor:
        if self.fixed is None:
            return torch.ones_like(losses)
        if len(self.fixed) != losses.numel():
            raise ValueError(
                f"LinearScalarization has {len(self.fixed)} weights but there are {losses.numel()} tasks; "
                "give one weight per task, in the order of `tasks`"
            )
        return torch.tensor(self.fixed, dtype=losses.dtype, device=losses.device)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"weights": self.fixed}
