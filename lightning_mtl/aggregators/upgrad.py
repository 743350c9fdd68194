"""UPGrad: average of the projections of the task gradients onto the dual cone of the Jacobian."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import (
    Quadratic,
    active_set_box_qp,
    as_weights,
    barrier_newton,
    polish_quadratic,
    quadratic_finisher,
)
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["UPGrad", "dual_cone_projection_weights"]


def dual_cone_projection_weights(gramian: Tensor, u: Tensor) -> Tensor:
    """Weights of the projections of ``J^T u_k`` onto the dual cone ``{x : J x >= 0}``.

    Args:
        gramian: float64 ``[m, m]``, ``G = J J^T`` (any scale; regularise it beforehand if wanted).
        u: float64 ``[K, m]``, one weight vector per row to project.

    Returns:
        ``V`` (``[K, m]``) with ``proj(J^T u_k) = J^T v_k``.

    Derivation: the projection of ``y = J^T u`` solves ``min_x 1/2 |x - y|^2`` s.t. ``J x >= 0``.
    With multipliers ``lam >= 0`` the Lagrangian ``1/2 |x - y|^2 - lam^T J x`` is minimised at
    ``x = y + J^T lam = J^T (u + lam)``, and the dual is
    ``max_{lam >= 0} -1/2 (u + lam)^T G (u + lam) + 1/2 u^T G u``. With ``v = u + lam`` this is
    ``min_v 1/2 v^T G v`` s.t. ``v >= u`` (Proposition 1 of Quinton & Rey), a QP with ``m``
    variables and simple bounds. Strong duality holds (linear constraints), so ``J^T v*`` is the
    projection; ``v*`` itself is unique when ``G`` is positive definite.

    The ``K`` QPs are solved in float64 on the device, all at once, by the primal-dual active-set
    method (:func:`~lightning_mtl.aggregators._solvers.active_set_box_qp`, a few small linear solves);
    a problem whose result is not KKT-certified falls back to the batched log-barrier Newton method
    of :func:`~lightning_mtl.aggregators._solvers.barrier_newton` with its exact finish and polish.
    """
    k, m = u.shape
    q = gramian.unsqueeze(0).expand(k, m, m)
    c = torch.zeros_like(u)
    x_as, certified_as = active_set_box_qp(gramian, c, u)
    if bool(certified_as.all()):
        return x_as
    finish = quadratic_finisher(q, c, u, simplex=False)
    x, t, certified = barrier_newton(Quadratic(q, c), u + 1.0, u, simplex=False, finish=finish)
    if not bool(certified.all()):
        x = polish_quadratic(q, c, u, x, t, simplex=False)
    return torch.where(certified_as[:, None], x_as, x)


@register_aggregator("upgrad")
class UPGrad(GramianWeighting):
    """Unconflicting projection of gradients (UPGrad).

    Quinton, P. and Rey, V. "Jacobian Descent for Multi-Objective Optimization." arXiv:2406.16232,
    2024 (the aggregator of the torchjd library).

    Every task gradient ``g_i`` is projected onto the dual cone of the rows of ``J``,
    ``C = {x : g_j . x >= 0 for all j}``, and the projections are combined with the preference
    weights ``p``: ``d = sum_i p_i proj_C(g_i)`` (default ``p_i = 1/m``, the mean). Since ``C`` is
    a convex cone, ``d`` is in ``C``: it does not conflict with any task (``g_j . d >= 0``), and it
    equals the plain weighted mean when no two gradients conflict. As ``proj_C(p_i g_i) =
    p_i proj_C(g_i)`` for ``p_i >= 0``, the weights are ``w = sum_i v_i`` with ``v_i`` the dual
    solution for ``u = p_i e_i`` (see :func:`dual_cone_projection_weights`).

    Like torchjd, the Gramian is normalised by its trace and a small multiple of the identity is
    added (``reg_eps``) to make the QPs strictly convex; torchjd's defaults are
    ``norm_eps = reg_eps = 1e-4`` and a host quadprog solver. We keep the trace normalisation but
    default to a much smaller ``reg_eps`` since the float64 barrier solver does not need it for
    stability (it only keeps degenerate cases such as ``g_2 = -g_1`` bounded).

    Args:
        pref_vector: preference weights ``p`` (non-negative, one per task); ``None`` gives ``1/m``.
        reg_eps: added to the diagonal of the trace-normalised Gramian.
        norm_eps: below this trace the Gramian is treated as zero (the weights are then ``p``).
    """

    def __init__(
        self, pref_vector: Sequence[float] | None = None, reg_eps: float = 1e-10, norm_eps: float = 1e-30
    ) -> None:
        super().__init__()
        if pref_vector is not None and any(p < 0 for p in pref_vector):
            raise ValueError("UPGrad pref_vector must be non-negative")
        self.pref_vector = None if pref_vector is None else [float(p) for p in pref_vector]
        self.reg_eps = float(reg_eps)
        self.norm_eps = float(norm_eps)

    def _pref(self, m: int, like: Tensor) -> Tensor:
        if self.pref_vector is None:
            return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
        if len(self.pref_vector) != m:
            raise ValueError(f"UPGrad has {len(self.pref_vector)} preference weights but there are {m} tasks")
        return torch.tensor(self.pref_vector, dtype=like.dtype, device=like.device)

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        g = gramian.detach().to(torch.float64)
        g = 0.5 * (g + g.T)
        trace = g.diagonal().sum()
        g_n = g / torch.where(trace > self.norm_eps, trace, torch.ones_like(trace))
        g_n = g_n + self.reg_eps * torch.eye(m, dtype=g.dtype, device=g.device)
        pref = self._pref(m, g_n)
        v = dual_cone_projection_weights(g_n, torch.diag(pref))
        return as_weights(v.sum(0), gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"pref_vector": self.pref_vector, "reg_eps": self.reg_eps}
