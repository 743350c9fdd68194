"""PCGrad: project each task gradient off the gradients it conflicts with, in random order."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights, normalized_gramian
from lightning_mtl.aggregators._state import SeededOrders
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["PCGrad", "pcgrad_coefficients"]


def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """PCGrad on the Gramian: ``C`` with ``g_i^PC = sum_l C[i, l] g_l`` (float64 ``[m, m]``).

    Args:
        gramian: float64 ``[m, m]`` (any positive scale).
        orders: ``[m, m - 1]``; row ``i`` is the order in which task ``i`` visits the others.

    All ``m`` projected gradients advance together: step ``k`` treats, for every ``i``, the task
    ``j = orders[i, k]``. Since ``g_i^PC . g_j = sum_l C[i, l] G[l, j]``, a projection
    ``g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j`` (only when the product is negative) is the update
    ``C[i, j] -= (g_i^PC . g_j) / G[j, j]``. Projections use the original ``g_j``, as in the paper.
    """
    m = gramian.shape[0]
    coef = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    if m == 1:
        return coef
    rows = torch.arange(m, device=gramian.device)
    orders = orders.to(gramian.device)
    diag = gramian.diagonal()
    for k in range(m - 1):
        j = orders[:, k]
        inner = (coef * gramian.index_select(1, j).T).sum(1)
        d_jj = diag.index_select(0, j)
        conflict = (inner < 0) & (d_jj > 0)
        step = inner / torch.where(d_jj > 0, d_jj, torch.ones_like(d_jj))
        step = torch.where(conflict, step, torch.zeros_like(inner))
        coef = coef.index_put((rows, j), -step, accumulate=True)
    return coef


@register_aggregator("pcgrad")
class PCGrad(SeededOrders, GramianWeighting):
    """Projecting conflicting gradients ("gradient surgery").

    Yu, T., Kumar, S., Gupta, A., Levine, S., Hausman, K. and Finn, C. "Gradient Surgery for
    Multi-Task Learning." NeurIPS 2020 (Algorithm 1).

    For every task ``i``, ``g_i^PC`` starts at ``g_i`` and visits the other tasks ``j`` in a random
    order; whenever ``g_i^PC . g_j < 0`` it is replaced by its projection on the normal plane of the
    original ``g_j``: ``g_i^PC -= (g_i^PC . g_j / |g_j|^2) g_j``. The update is
    ``sum_i g_i^PC`` (the paper; ``reduction="mean"`` divides by ``m``).

    Every ``g_i^PC`` is a combination ``sum_l C[i, l] g_l`` and all the inner products it needs are
    entries of ``C G``, so the algorithm runs on the ``m x m`` Gramian (float64, on its device) and
    returns the weights ``w_l = sum_i C[i, l]``; no ``n``-dimensional vector is touched. The visiting
    orders come from a CPU generator (independent per task, as in Algorithm 1; the official
    TensorFlow code instead shuffles once per step, shared by all tasks, and includes ``j = i``).

    Args:
        reduction: ``"sum"`` (default, the paper) or ``"mean"``.
        seed: seed of the generator of the random orders; ``None`` draws one from torch's global
            generator. The generator state is part of ``state_dict()``.
    """

    def __init__(self, reduction: str = "sum", seed: int | None = None) -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"PCGrad reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self._init_generator(seed)

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        g_n, _ = normalized_gramian(gramian)  # the result is invariant to the scale of G
        coef = pcgrad_coefficients(g_n, self.sample_orders(m))
        weights = coef.sum(0)
        if self.reduction == "mean":
            weights = weights / m
        return as_weights(weights, gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"reduction": self.reduction, "seed": self.seed}
