"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import (
    Quadratic,
    as_weights,
    barrier_newton,
    kkt_certified,
    min_norm_point,
    normalized_gramian,
    polish_quadratic,
    quadratic_finisher,
)
from lightning_mtl.aggregators.base import GramianWeighting, as_float64
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["MGDA", "min_norm_weights"]


def min_norm_weights(gramian: Tensor) -> Tensor:
    """``argmin_{w in simplex} w^T G w`` in float64 (``G`` already float64, any scale).

    The problem is scale-invariant, so it is solved on ``G / mean(diag G)``: barrier Newton with
    the certified early exit of :func:`~lightning_mtl.aggregators._solvers.quadratic_finisher`
    (2 to 4 Newton steps on random problems), else the exact polish of
    :func:`~lightning_mtl.aggregators._solvers.polish_quadratic` if it passes the KKT certificate,
    else Wolfe's algorithm (:func:`~lightning_mtl.aggregators._solvers.min_norm_point`; min-norm
    points far below the barrier's duality gap). ``m = 1`` gives ``[1]``;
    ``G = 0`` gives the uniform weights (every point of the simplex is optimal; the barrier picks
    its centre).
    """
    m = gramian.shape[-1]
    if m == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    g_n, _ = normalized_gramian(gramian)
    q = g_n.unsqueeze(0)
    c = torch.zeros(1, m, dtype=g_n.dtype, device=g_n.device)
    lower = torch.zeros_like(c)
    x0 = torch.full_like(c, 1.0 / m)
    finish = quadratic_finisher(q, c, lower, simplex=True)
    x, t, certified = barrier_newton(Quadratic(q, c), x0, lower, simplex=True, check_every=2, finish=finish)
    if not bool(certified.all()):
        x = polish_quadratic(q, c, lower, x, t, simplex=True)
        # A min-norm point far below the barrier's duality gap (one gradient 1e4 times smaller than
        # the others) leaves the support in doubt: only a certified result stands, else Wolfe's.
        if not bool(kkt_certified(q, c, lower, x, simplex=True).all()):
            return min_norm_point(g_n)
    return x[0]


@register_aggregator("mgda")
class MGDA(GramianWeighting):
    """Multiple-gradient descent: the min-norm element of the convex hull of the task gradients.

    Sener, O. and Koltun, V. "Multi-Task Learning as Multi-Objective Optimization." NeurIPS 2018
    (building on Désidéri's MGDA, 2012). The weights solve

    ``w* = argmin_{w >= 0, sum(w) = 1} w^T G w``,

    so ``d = J^T w*`` is the shortest vector of ``conv{g_1, ..., g_m}``; if ``d != 0`` it has a
    positive inner product ``>= |d|^2`` with every task gradient (KKT:
    ``(G w*)_i >= w*^T G w*``, with equality where ``w*_i > 0``). The paper's Frank-Wolfe solver is
    replaced by an exact one: a float64 log-barrier Newton method on the device whose iterates
    reveal the support, on which the KKT system is solved exactly and certified (see
    :mod:`lightning_mtl.aggregators._solvers`). Singular
    Gramians (repeated or zero gradients) and ``m = 1`` are handled; an all-zero ``G`` yields
    uniform weights.

    The weights sum to 1 (the paper's convention; the Nash-MTL code rescales them to sum to m).
    Computing ``G`` on the gradients w.r.t. the shared representation instead of the parameters
    gives MGDA-UB, the paper's cheap upper-bound variant; that choice belongs to the engine.

    Args:
        normalization: gradient normalisation before the min-norm problem, as in the official
            code: ``"none"`` (default, the paper's algorithm) or ``"l2"`` (each gradient divided by
            its norm ``sqrt(G_ii)``). As in the official code, the weights found for the normalised
            gradients are applied to the raw gradients (LibMTL instead returns
            ``sum_i w_i g_i / |g_i|``). The official ``"loss"``/``"loss+"`` modes need the loss
            values and are not offered.
    """

    def __init__(self, normalization: str = "none") -> None:
        super().__init__()
        if normalization not in ("none", "l2"):
            raise ValueError(f"MGDA normalization must be 'none' or 'l2', got {normalization!r}")
        self.normalization = normalization

    def forward(self, gramian: Tensor) -> Tensor:
        g = as_float64(gramian)
        if self.normalization == "l2":
            norms = g.diagonal().clamp_min(0).sqrt()
            norms = torch.where(norms > 0, norms, torch.ones_like(norms))
            g = g / (norms[:, None] * norms[None, :])
        return as_weights(min_norm_weights(g), gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"normalization": self.normalization}
