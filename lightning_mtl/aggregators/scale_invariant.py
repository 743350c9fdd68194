"""Scale-invariant linear scalarization: the sum of the log task losses."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["ScaleInvariantLS"]


@register_aggregator("si_ls", "log_ls", "scale_invariant")
class ScaleInvariantLS(LossWeighting):
    """Scale-invariant linear scalarization (SI): minimize ``sum_i log l_i``.

    As evaluated in Navon et al., "Multi-Task Learning as a Bargaining Game" (ICML 2022) and
    Kurin et al., "In Defense of the Unitary Scalarization for Deep Multi-Task Learning"
    (NeurIPS 2022). Its gradient ``sum_i grad l_i / l_i`` does not change when a task's loss is
    multiplied by a constant, i.e. the implied weights are ``1 / l_i`` (logged as such). Under DDP
    each rank takes the log of its own batch's losses (the average of per-rank logs, not the log of
    the global mean): a local semantics, like the per-rank batch statistics of BatchNorm.

    Args:
        eps: added to each loss inside the log.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = float(eps)

    def weights(self, losses: Tensor) -> Tensor:
        return 1.0 / (losses.detach() + self.eps)

    def forward(self, losses: Tensor) -> Tensor:
        self.last_weights = self.weights(losses)
        return torch.log(losses + self.eps).sum()

    def hparams_for_repr(self) -> dict[str, object]:
        return {"eps": self.eps}
