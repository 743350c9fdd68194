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

    weight_vector: Tensor  # a buffer, registered in __init__ (declared here for the type checker)

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.fixed: list[float] | None = None
        # a buffer moves with the module, so no host-to-device copy (and no device sync) per step
        self.register_buffer("weight_vector", torch.ones(0), persistent=False)
        if weights is not None:
            self.set_weights(weights)

    def set_weights(self, weights: Sequence[float]) -> None:
        self.fixed = [float(w) for w in weights]
        self.weight_vector = torch.tensor(self.fixed, device=self.weight_vector.device)

    def weights(self, losses: Tensor) -> Tensor:
        if self.fixed is None:
            return torch.ones_like(losses)
        if len(self.fixed) != losses.numel():
            raise ValueError(
                f"LinearScalarization has {len(self.fixed)} weights but there are {losses.numel()} tasks; "
                "give one weight per task, in the order of `tasks`"
            )
        return self.weight_vector.to(losses.dtype)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"weights": self.fixed}
