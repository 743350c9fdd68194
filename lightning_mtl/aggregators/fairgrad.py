"""FairGrad: alpha-fair task weights, ``(G w)_i = w_i^(-1/alpha)``."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights, normalized_gramian, solve_power_balance
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["FairGrad"]


@register_aggregator("fairgrad")
class FairGrad(GramianWeighting):
    """Fair resource allocation in multi-task learning (FairGrad).

    Ban, H. and Ji, K. "Fair Resource Allocation in Multi-Task Learning." ICML 2024.

    The update ``d = J^T w`` maximises the alpha-fair utility of the per-task improvements
    ``g_i . d``; its optimality conditions are ``(G w)_i = w_i^(-1/alpha)``, ``w > 0``, on the raw
    Gramian. ``alpha = 1`` is proportional fairness (the same equations as Nash-MTL), larger
    ``alpha`` moves towards max-min fairness.

    Solver: the official code runs ``scipy.optimize.least_squares`` with bounds ``(0, inf)`` on the
    residual ``G w - w^(-1/alpha)`` from ``w = 1/m`` on the host. Here the equations are the
    stationarity conditions of a strictly convex function, solved by Newton's method with a
    vectorised line search in float64 on the device (:func:`~lightning_mtl.aggregators._solvers.
    solve_power_balance`). It is solved on ``G / s`` (``s`` = mean of the diagonal) and mapped back
    exactly: if ``u`` solves the scaled equations, ``w = s^(-alpha / (alpha + 1)) u`` solves the raw
    ones, so the result matches the official semantics at any gradient scale. A task with a zero
    gradient gets weight 0 (the equations have no solution for it).

    Args:
        alpha: fairness parameter (default 1.0; the paper tunes it per benchmark).
        max_iter: maximum number of Newton steps.
    """

    def __init__(self, alpha: float = 1.0, max_iter: int = 50) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"FairGrad alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.max_iter = int(max_iter)

    def forward(self, gramian: Tensor) -> Tensor:
        g_n, scale = normalized_gramian(gramian)
        u, _ = solve_power_balance(g_n, 1.0 / self.alpha, None, self.max_iter)
        w = u * scale.pow(-self.alpha / (self.alpha + 1.0))
        return as_weights(w, gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"alpha": self.alpha}
