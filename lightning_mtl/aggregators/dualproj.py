"""DualProj: projection of the mean gradient onto the dual cone of the task gradients."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.aggregators.registry import register_aggregator
from lightning_mtl.aggregators.upgrad import DualConeWeighting, dual_cone_projection_weights

__all__ = ["DualProj"]


@register_aggregator("dualproj", "dual_proj")
class DualProj(DualConeWeighting):
    """Projection of the (preference-weighted) mean gradient onto the dual cone (DualProj).

    Quinton, P. and Rey, V. "Jacobian Descent for Multi-Objective Optimization." arXiv:2406.16232,
    2024 (an aggregator of the torchjd library, beside UPGrad).

    ``d = proj_C(J^T p)`` with ``C = {x : g_j . x >= 0 for all j}`` the dual cone of the rows of
    ``J`` and ``p`` the preference weights (default ``1/m``, the mean): the closest direction to the
    mean gradient that conflicts with no task. It is the mean itself when the mean conflicts with
    no task. UPGrad projects each gradient and averages; DualProj averages and projects once (one QP
    instead of ``m``).

    The weights are the dual solution ``v`` for ``u = p`` (:func:`~lightning_mtl.aggregators.
    upgrad.dual_cone_projection_weights`, shared with UPGrad: the same trace normalisation,
    regularisation relative to each task's ``G_ii``, float64 active-set solver with certified
    fallback).

    Args:
        pref_vector: preference weights ``p`` (non-negative, one per task); ``None`` gives ``1/m``.
        reg_eps: added to the diagonal of the Gramian, times each task's ``G_ii``.
        norm_eps: below this trace the Gramian is treated as zero (the weights are then ``p``).
    """

    def weights(self, g_n: Tensor, pref: Tensor) -> Tensor:
        # one projection, of the preference-weighted mean (u = p)
        return dual_cone_projection_weights(g_n, pref.unsqueeze(0), self.reg_eps)[0]
