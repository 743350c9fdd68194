"""IMTL-G: the update has the same projection on every unit task gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights, normalized_gramian
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["IMTLG", "imtl_g_weights"]


def imtl_g_weights(gramian: Tensor, zero_tol: float = 1e-20) -> Tensor:
    """IMTL-G weights (float64 ``[m]``, summing to 1) from a float64 Gramian.

    With ``u_i = g_i / |g_i|`` and ``d = sum_i a_i g_i``, the conditions are
    ``(u_r - u_j) . d = 0`` for every ``j != r`` (equal projections) and ``sum_i a_i = 1``. Since
    ``u_i . g_l = G[i, l] / |g_i|``, row ``j`` of the linear system is ``V[r] - V[j]`` with
    ``V = diag(1 / |g|) G``; the last condition replaces row ``r``. The paper's closed form
    ``a_{2..m} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2..m}`` (``D``, ``U``: differences of the
    gradients and of the unit gradients w.r.t. task 1) is this system solved for ``a_{2..m}``.

    Robustness: the reference task ``r`` is the one with the largest gradient (not task 1), tasks
    whose gradient is zero (``G_ii <= zero_tol * max G``) get weight 0 (their "unit vector" is
    undefined), and the system is solved with a pseudo-inverse, so linearly dependent gradients
    give the least-squares / minimum-norm solution instead of an error.
    """
    m = gramian.shape[0]
    if m == 1:
        return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
    g_n, _ = normalized_gramian(gramian)
    sq = g_n.diagonal().clamp_min(0)
    active = sq > zero_tol * sq.max()
    norms = torch.where(active, sq.sqrt(), torch.ones_like(sq))
    v = torch.where(active[:, None], g_n / norms[:, None], torch.zeros_like(g_n))  # V[i, l] = u_i . g_l
    ref = sq.argmax()
    eye = torch.eye(m, dtype=g_n.dtype, device=g_n.device)
    is_ref = torch.arange(m, device=g_n.device) == ref
    diff = v.index_select(0, ref.reshape(1)) - v  # row j: (u_r - u_j) . g_l
    system = torch.where(active[:, None], diff, eye)
    system = torch.where(is_ref[:, None], torch.ones_like(system), system)
    rhs = is_ref.to(g_n.dtype)
    weights = torch.linalg.pinv(system) @ rhs
    return torch.where(active | is_ref, weights, torch.zeros_like(weights))


@register_aggregator("imtl_g", "imtl")
class IMTLG(GramianWeighting):
    """Impartial multi-task learning, gradient part (IMTL-G).

    Liu, L., Li, Y., Kuang, Z., Xue, J.-H., Chen, Y., Yang, W., Liao, Q. and Zhang, W. "Towards
    Impartial Multi-task Learning." ICLR 2021.

    Finds ``d = sum_i a_i g_i`` with ``sum_i a_i = 1`` whose projection on every unit task gradient
    ``u_i = g_i / |g_i|`` is the same, ``d . u_i = d . u_j``, so no task dominates the update. The
    closed form of the paper is expressed on the Gramian (see :func:`imtl_g_weights`); it is
    equivalent to ``a ∝ G^{-1} (|g_1|, ..., |g_m|)`` when ``G`` is invertible (the form torchjd uses
    with a pseudo-inverse). The weights may be negative when gradients are strongly correlated.

    Notes:
        IMTL also has a loss-balancing part (IMTL-L, learnable loss scales); LibMTL's ``IMTL``
        combines both. Only the gradient part is implemented here, also under the alias ``imtl``.

    Args:
        zero_tol: a task whose squared gradient norm is below ``zero_tol`` times the largest one is
            treated as having a zero gradient (weight 0).
    """

    def __init__(self, zero_tol: float = 1e-20) -> None:
        super().__init__()
        self.zero_tol = float(zero_tol)

    def forward(self, gramian: Tensor) -> Tensor:
        g = gramian.detach().to(torch.float64)
        return as_weights(imtl_g_weights(g, self.zero_tol), gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"zero_tol": self.zero_tol}
