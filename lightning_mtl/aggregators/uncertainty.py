"""Uncertainty weighting: task weights from learned homoscedastic uncertainties."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["UncertaintyWeighting"]


@register_aggregator("uw", "uncertainty")
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (UW).

    Kendall, A., Gal, Y. and Cipolla, R. "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics." CVPR 2018.

    Learns ``s_i = log sigma_i^2`` per task and minimizes ``sum_i exp(-s_i) l_i + s_i``. For fixed
    losses the optimum is ``s_i = log l_i``, i.e. every weighted loss is 1. The paper puts 1/2 in
    front of regression terms; we use the same form for every task, as LibMTL and most re-runs do.
    The ``s_i`` are parameters of this module, so the LightningModule's optimizer trains them (they
    are in checkpoints and identical on every DDP rank).

    Args:
        init: initial value of every ``s_i``.
    """

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.init = float(init)
        self.log_vars = nn.Parameter(torch.zeros(0))

    def bind_tasks(self, names: tuple[str, ...]) -> None:
        self.log_vars = nn.Parameter(torch.full((len(names),), self.init))

    def weights(self, losses: Tensor) -> Tensor:
        return torch.exp(-self.log_vars.detach()).to(losses.dtype)

    def forward(self, losses: Tensor) -> Tensor:
        if self.log_vars.numel() != losses.numel():
            raise ValueError(f"UncertaintyWeighting was bound to {self.log_vars.numel()} tasks, got {losses.numel()}")
        log_vars = self.log_vars.to(losses.dtype)
        self.last_weights = torch.exp(-log_vars.detach())
        return (torch.exp(-log_vars) * losses + log_vars).sum()

    def hparams_for_repr(self) -> dict[str, object]:
        return {"init": self.init}
