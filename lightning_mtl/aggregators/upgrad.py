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

__all__ = ["UPGrad", "dual_cone_projection_weights", "preference_weights", "trace_normalized"]


def dual_cone_projection_weights(gramian: Tensor, u: Tensor, reg_eps: float = 0.0) -> Tensor:
    """Weights of the projections of ``J^T u_k`` onto the dual cone ``{x : J x >= 0}``.

    Args:
        gramian: float64 ``[m, m]``, ``G = J J^T`` (any scale).
        u: float64 ``[K, m]``, one weight vector per row to project.
        reg_eps: added to the diagonal of ``G`` relative to each task's own ``G_ii`` (it keeps the
            QPs strictly convex, e.g. for ``g_2 = -g_1``, and never swamps a small task).

    Returns:
        ``V`` (``[K, m]``) with ``proj(J^T u_k) = J^T v_k``.

    Derivation: the projection of ``y = J^T u`` solves ``min_x 1/2 |x - y|^2`` s.t. ``J x >= 0``.
    With multipliers ``lam >= 0`` the Lagrangian ``1/2 |x - y|^2 - lam^T J x`` is minimised at
    ``x = y + J^T lam = J^T (u + lam)``, and the dual is
    ``max_{lam >= 0} -1/2 (u + lam)^T G (u + lam) + 1/2 u^T G u``. With ``v = u + lam`` this is
    ``min_v 1/2 v^T G v`` s.t. ``v >= u`` (Proposition 1 of Quinton & Rey), a QP with ``m``
    variables and simple bounds. Strong duality holds (linear constraints), so ``J^T v*`` is the
    projection; ``v*`` itself is unique when ``G`` is positive definite.

    The QPs are solved for ``z = D v`` with ``D = diag(sqrt(G_ii))``: ``min 1/2 z^T C z`` s.t.
    ``z >= D u``, with ``C = D^-1 G D^-1`` the matrix of cosines, so every task is resolved at its
    own scale (a task 1e7 times smaller than the others would otherwise sit below their round-off);
    a task with a zero gradient keeps ``v_i = u_i``. The ``K`` QPs are solved in float64 on the
    device, all at once, by the primal-dual active-set method
    (:func:`~lightning_mtl.aggregators._solvers.active_set_box_qp`, a few small linear solves); a
    problem whose result is not KKT-certified falls back to the batched log-barrier Newton method
    of :func:`~lightning_mtl.aggregators._solvers.barrier_newton` with its exact finish and polish.
    """
    k, m = u.shape
    sq = gramian.diagonal().clamp_min(0)
    active = sq > 1e-30 * sq.max()  # a gradient 1e15 times shorter than the longest counts as zero
    root = torch.where(active, sq.sqrt(), torch.ones_like(sq))
    both = active[:, None] & active[None, :]
    cos = torch.where(both, gramian / (root[:, None] * root[None, :]), torch.zeros_like(gramian))
    cos = cos + torch.diag(torch.where(active, torch.full_like(sq, reg_eps), torch.ones_like(sq)))
    lower = torch.where(active, u * root, torch.zeros_like(u))  # a zero task is decoupled, z_i = 0
    q = cos.unsqueeze(0).expand(k, m, m)
    c = torch.zeros_like(u)
    z_as, certified_as = active_set_box_qp(cos, c, lower)
    if bool(certified_as.all()):
        z = z_as
    else:
        finish = quadratic_finisher(q, c, lower, simplex=False)
        z, t, certified = barrier_newton(Quadratic(q, c), lower + 1.0, lower, simplex=False, finish=finish)
        if not bool(certified.all()):
            z = polish_quadratic(q, c, lower, z, t, simplex=False)
        z = torch.where(certified_as[:, None], z_as, z)
    return torch.where(active, z / root, u)


def trace_normalized(gramian: Tensor, norm_eps: float) -> Tensor:
    """``G / trace(G)`` in float64, exactly symmetric; zero when the trace is below ``norm_eps``."""
    g = gramian.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    trace = g.diagonal().sum()
    return torch.where(trace > norm_eps, g / torch.where(trace > norm_eps, trace, torch.ones_like(trace)), 0.0)


def preference_weights(pref_vector: list[float] | None, m: int, like: Tensor, method: str) -> Tensor:
    """The preference weights ``p`` (``1/m`` each by default) as a tensor like ``like``."""
    if pref_vector is None:
        return torch.full((m,), 1.0 / m, dtype=like.dtype, device=like.device)
    if len(pref_vector) != m:
        raise ValueError(f"{method} has {len(pref_vector)} preference weights but there are {m} tasks")
    return torch.tensor(pref_vector, dtype=like.dtype, device=like.device)


class DualConeWeighting(GramianWeighting):
    """What UPGrad and DualProj share: preference weights ``p`` and the dual-cone projection's settings.

    Args:
        pref_vector: preference weights ``p`` (non-negative, one per task); ``None`` gives ``1/m``.
        reg_eps: added to the diagonal of the Gramian, times each task's ``G_ii``.
        norm_eps: below this trace the Gramian is treated as zero (the weights are then ``p``).
    """

    def __init__(
        self, pref_vector: Sequence[float] | None = None, reg_eps: float = 1e-10, norm_eps: float = 1e-30
    ) -> None:
        super().__init__()
        if pref_vector is not None and any(p < 0 for p in pref_vector):
            raise ValueError(f"{type(self).__name__} pref_vector must be non-negative")
        self.pref_vector = None if pref_vector is None else [float(p) for p in pref_vector]
        self.reg_eps = float(reg_eps)
        self.norm_eps = float(norm_eps)

    def forward(self, gramian: Tensor) -> Tensor:
        g_n = trace_normalized(gramian, self.norm_eps)
        pref = preference_weights(self.pref_vector, g_n.shape[0], g_n, type(self).__name__)
        return as_weights(self.weights(g_n, pref), gramian)

    def weights(self, g_n: Tensor, pref: Tensor) -> Tensor:
        """The weights ``w`` (``d = J^T w``) from the trace-normalised Gramian and the preferences."""
        raise NotImplementedError

    def hparams_for_repr(self) -> dict[str, object]:
        return {"pref_vector": self.pref_vector, "reg_eps": self.reg_eps}


@register_aggregator("upgrad")
class UPGrad(DualConeWeighting):
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

    Like torchjd, the Gramian is normalised by its trace and regularised (``reg_eps``) to make the
    QPs strictly convex; torchjd adds ``reg_eps = 1e-4`` times the identity to the normalised
    Gramian and uses a host quadprog solver. Here the regularisation is relative to each task's own
    ``G_ii`` (a multiple of the identity swamps a task whose share of the trace is below it: with
    one conflicting task 1e4 times smaller the update conflicted with it), and its default is much
    smaller since the float64 solvers do not need it for stability (it only keeps degenerate cases
    such as ``g_2 = -g_1`` bounded).

    Args:
        pref_vector: preference weights ``p`` (non-negative, one per task); ``None`` gives ``1/m``.
        reg_eps: added to the diagonal of the Gramian, times each task's ``G_ii``.
        norm_eps: below this trace the Gramian is treated as zero (the weights are then ``p``).
    """

    def weights(self, g_n: Tensor, pref: Tensor) -> Tensor:
        # one projection per task gradient (u = p_i e_i), summed
        return dual_cone_projection_weights(g_n, torch.diag(pref), self.reg_eps).sum(0)
