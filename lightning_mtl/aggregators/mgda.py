"""MGDA: the min-norm point of the convex hull of the task gradients.

This file also holds the small float64 solvers that several Gramian methods share (MGDA, CAGrad
and UPGrad all solve a convex problem over ``m`` weights): a batched log-barrier Newton method with
a vectorised line search, and an exact "polishing" step for quadratic programs. Both run on the
device of the Gramian with fixed tensor shapes, so a GPU solve never copies ``G`` to the host; the
only host synchronisation is an occasional "all converged?" test that lets the loop stop early.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import GramianWeighting, as_float64
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["MGDA", "min_norm_weights"]


# ---------------------------------------------------------------------------------------------
# Shared numerics
# ---------------------------------------------------------------------------------------------


def normalized_gramian(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """``G / s`` in float64 with ``s`` the mean of the diagonal (1 when ``G`` is all zero).

    Every solver here works on this scale-free copy, so thresholds such as "this gradient is zero"
    are relative and the iterates stay O(1) whatever the magnitude of the gradients.
    """
    g = as_float64(gramian)
    g = 0.5 * (g + g.T)  # exact symmetry; a Gramian computed in low precision may not be
    scale = g.diagonal().mean()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return g / scale, scale


def as_weights(w: Tensor, like: Tensor) -> Tensor:
    """Weights are returned in float32 on the device of the input, whatever the input dtype."""
    return w.to(device=like.device, dtype=torch.float32)


def solve_small(a: Tensor, b: Tensor) -> Tensor:
    """``a^-1 b`` for a batch of small systems (``a`` ``[B, m, m]``, ``b`` ``[B, m, k]``), no raise.

    On the CPU the batch is solved one system at a time: batched LAPACK calls go through a
    parallel loop whose thread synchronisation costs milliseconds on a busy machine, far more than
    the solves themselves. On accelerators one batched call is made.
    """
    if a.shape[0] == 1 or a.device.type != "cpu":
        return torch.linalg.solve_ex(a, b)[0]
    return torch.stack([torch.linalg.solve_ex(a[i], b[i])[0] for i in range(a.shape[0])])


class ConvexObjective(Protocol):
    """What :func:`barrier_newton` needs from the objective ``F`` (batched over the first dim)."""

    def grad_hess(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient ``[B, m]`` and Hessian ``[B, m, m]`` of ``F`` at ``x`` (``[B, m]``)."""
        ...

    def delta(self, x: Tensor, dx: Tensor, steps: Tensor) -> Tensor:
        """``F(x + a dx) - F(x)`` for every step ``a`` in ``steps`` (``[B, K]``), computed without
        cancellation (the line search compares tiny decreases near the optimum)."""
        ...


class Quadratic:
    """``F(x) = 1/2 x^T Q x + c^T x`` with ``Q`` ``[B, m, m]`` (PSD) and ``c`` ``[B, m]``."""

    def __init__(self, q: Tensor, c: Tensor) -> None:
        self.q, self.c = q, c

    def grad_hess(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (self.q @ x.unsqueeze(-1)).squeeze(-1) + self.c, self.q

    def delta(self, x: Tensor, dx: Tensor, steps: Tensor) -> Tensor:
        grad = (self.q @ x.unsqueeze(-1)).squeeze(-1) + self.c
        lin = (grad * dx).sum(-1, keepdim=True)
        quad = (dx * (self.q @ dx.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)
        return steps * lin + 0.5 * steps.square() * quad


def barrier_newton(
    objective: ConvexObjective,
    x0: Tensor,
    lower: Tensor,
    *,
    simplex: bool,
    t0: float | None = None,
    t_max: float = 1e12,
    mu: float = 100.0,
    max_iter: int = 120,
    check_every: int = 3,
    finish: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise a smooth convex ``F`` subject to ``x >= lower`` (and ``sum(x) = 1`` if ``simplex``).

    A primal log-barrier method: Newton steps on ``t F(x) - sum_i log(x_i - lower_i)`` with ``t``
    multiplied by ``mu`` whenever the iterate is centred (Newton decrement below 0.1), up to
    ``t_max``; at the end the duality gap is about ``m / t_max`` (on the caller's scale; the
    callers normalise their problems to O(1)); random problems with m <= 16 take 10 to 50 Newton
    steps (mean about 16) without an early exit. The equality constraint is handled in the Newton system, the line search evaluates 30 step lengths
    at once (no data-dependent branching), and the Hessian is scaled by its diagonal before the
    solve, which keeps the barrier terms (up to ``1/s^2 ~ t^2``) from ruining the conditioning.

    Args:
        objective: the convex function; see :class:`ConvexObjective`.
        x0: strictly feasible start ``[B, m]`` (``x0 > lower``, and summing to 1 if ``simplex``).
        lower: lower bounds ``[B, m]``.
        simplex: also impose ``sum(x) = 1``.
        check_every: every this many Newton steps, test (one host synchronisation) whether all
            problems are done, and try ``finish``.
        finish: optional ``(x, t) -> (candidate, certified)``; problems whose candidate is
            certified optimal take it and stop (see :func:`quadratic_finisher`).

    Returns:
        ``(x, t)``: the solution ``[B, m]`` and the final barrier parameter per problem ``[B]``.
    """
    x = x0.clone()
    batch, m = x.shape
    dtype, device = x.dtype, x.device
    if t0 is None:
        # Start where t * grad F best balances the barrier's gradient 1/s at x0 (least squares),
        # so a nearly flat objective (tiny G) starts at a large t instead of a long damped walk.
        grad0, _ = objective.grad_hess(x)
        h0 = 1.0 / (x - lower)
        if simplex:
            grad0 = grad0 - grad0.mean(-1, keepdim=True)
            h0 = h0 - h0.mean(-1, keepdim=True)
        num, den = (grad0 * h0).sum(-1), grad0.square().sum(-1)
        t = torch.where((num > 0) & (den > 0), num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
        t = t.clamp(1e-2, t_max)
    else:
        t = torch.full((batch,), t0, dtype=dtype, device=device)
    steps_grid = 0.5 ** torch.arange(30, dtype=dtype, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tiny = torch.finfo(dtype).tiny
    for it in range(max_iter):
        s = x - lower
        grad, hess = objective.grad_hess(x)
        g_t = t[:, None] * grad - 1.0 / s
        h_t = t[:, None, None] * hess + torch.diag_embed(s.pow(-2))
        d = h_t.diagonal(dim1=-2, dim2=-1).clamp_min(tiny).rsqrt()
        h_s = d[:, :, None] * h_t * d[:, None, :]
        if simplex:
            # Adding a multiple of 1 to g_t leaves the constrained step unchanged; removing its
            # x-weighted mean first avoids cancelling two O(t) terms below (t reaches 1e12).
            g_t = g_t - (x * g_t).sum(-1, keepdim=True) / x.sum(-1, keepdim=True)
            rhs = torch.stack([-g_t * d, d], dim=-1)
            sol = solve_small(h_s, rhs)
            y1, y2 = d * sol[..., 0], d * sol[..., 1]  # -H^-1 g and H^-1 1
            dx = y1 - (y1.sum(-1, keepdim=True) / y2.sum(-1, keepdim=True)) * y2
        else:
            sol = solve_small(h_s, (-g_t * d).unsqueeze(-1))
            dx = d * sol.squeeze(-1)
        dx = torch.where(torch.isfinite(dx), dx, torch.zeros_like(dx))
        lam2 = -(g_t * dx).sum(-1)  # squared Newton decrement
        # Largest step that keeps x strictly feasible, then a grid of fractions of it.
        ratio = torch.where(dx < 0, -s / dx.clamp(max=-tiny), torch.full_like(s, float("inf")))
        cap = (0.99 * ratio.amin(-1)).clamp(max=1.0)
        steps = cap[:, None] * steps_grid[None, :]
        barrier = -torch.log1p(steps[:, :, None] * (dx / s)[:, None, :]).sum(-1)
        value = t[:, None] * objective.delta(x, dx, steps) + barrier
        best = value.argmin(-1, keepdim=True)
        gain = value.gather(-1, best).squeeze(-1)
        step = torch.where(gain < 0, steps.gather(-1, best).squeeze(-1), torch.zeros_like(cap))
        # Near the central point the full step is safe, while values no longer resolve the decrease.
        step = torch.where(lam2 < 1e-2, cap, step)
        step = torch.where(done, torch.zeros_like(step), step)
        x = x + step[:, None] * dx
        centred = lam2 < 0.1
        done = done | ((t >= t_max) & (centred | (step == 0)))
        t = torch.where(centred & ~done, (t * mu).clamp(max=t_max), t)
        if (it + 1) % check_every == 0:
            if finish is not None:
                cand, ok = finish(x, t)
                ok = ok & ~done
                x = torch.where(ok[:, None], cand, x)
                t = torch.where(ok, torch.full_like(t, t_max), t)
                done = done | ok
            if bool(done.all()):
                break
    return x, t


def _support_solution(q: Tensor, c: Tensor, lower: Tensor, x: Tensor, t: Tensor, *, simplex: bool) -> Tensor:
    """Solve the QP's KKT conditions on the support guessed from a barrier iterate.

    At a point of the central path the bound multipliers are ``z_i = 1 / (t s_i)``; a coordinate is
    taken as free when its slack exceeds its multiplier (``s_i^2 t > 1``). With the free set F the
    KKT conditions are linear: ``(Q x + c)_F (+ nu) = 0``, ``x_i = lower_i`` off F (and
    ``sum(x) = 1``). That symmetric system is solved with a pseudo-inverse (``Q_FF`` is singular
    when gradients repeat).
    """
    batch, m = x.shape
    free = (x - lower).square() * t[:, None] > 1.0
    both = free[:, :, None] & free[:, None, :]
    eye = torch.eye(m, dtype=x.dtype, device=x.device).expand(batch, m, m)
    a = torch.where(both, q, torch.zeros_like(q)) + torch.where(free[:, :, None], torch.zeros_like(eye), eye)
    fixed = torch.where(free, torch.zeros_like(lower), lower)
    rhs = torch.where(free, -c - (q @ fixed.unsqueeze(-1)).squeeze(-1), lower)
    if simplex:
        col = free.to(x.dtype)
        top = torch.cat([a, col.unsqueeze(-1)], dim=-1)
        bottom = torch.cat([col, torch.zeros(batch, 1, dtype=x.dtype, device=x.device)], dim=-1).unsqueeze(1)
        a = torch.cat([top, bottom], dim=1)
        rhs = torch.cat([rhs, (1.0 - fixed.sum(-1)).unsqueeze(-1)], dim=-1)
    sol = (torch.linalg.pinv(a, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)[:, :m]
    return torch.where(free & torch.isfinite(sol), sol, lower)


def kkt_certified(q: Tensor, c: Tensor, lower: Tensor, x: Tensor, *, simplex: bool, tol: float = 1e-10) -> Tensor:
    """Whether ``x`` is an optimal solution of the QP (per problem, ``[B]`` booleans).

    Checks the KKT conditions with multipliers computed from ``x``: feasibility, zero (reduced)
    gradient on the free coordinates, non-negative multipliers on the coordinates at their bound.
    ``tol`` is relative to the largest diagonal entry of ``Q``. Since the problem is convex, a
    point that passes is a global minimiser.
    """
    scale = q.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(q.dtype).tiny)
    r = (q @ x.unsqueeze(-1)).squeeze(-1) + c
    free = x > lower
    if simplex:
        nu = torch.where(free, r, torch.zeros_like(r)).sum(-1) / free.sum(-1).clamp_min(1)
        r = r - nu[:, None]
        feasible = (x >= 0).all(-1) & ((x.sum(-1) - 1).abs() <= 1e-12)
    else:
        feasible = (x >= lower).all(-1)
    stationary = torch.where(free, r.abs(), torch.zeros_like(r)).amax(-1) <= tol * scale
    dual = torch.where(free, torch.zeros_like(r), r).amin(-1) >= -tol * scale
    return feasible & stationary & dual


def polish_quadratic(q: Tensor, c: Tensor, lower: Tensor, x: Tensor, t: Tensor, *, simplex: bool) -> Tensor:
    """Exact solution of the QP on the support found by :func:`barrier_newton`, when it is better.

    See :func:`_support_solution`. The result replaces the barrier iterate only if it is feasible
    and its objective is not larger, so a wrong guess of the support never makes things worse.
    """
    batch = x.shape[0]
    sol = _support_solution(q, c, lower, x, t, simplex=simplex)
    sol = torch.maximum(sol, lower)
    if simplex:
        sol = sol / sol.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    better = Quadratic(q, c).delta(x, sol - x, torch.ones(batch, 1, dtype=x.dtype, device=x.device))
    ok = better.squeeze(-1) <= 1e-13
    return torch.where(ok[:, None], sol, x)


def quadratic_finisher(q: Tensor, c: Tensor, lower: Tensor, *, simplex: bool):  # type: ignore[no-untyped-def]
    """Early exit for :func:`barrier_newton` on a QP: the support solution when KKT-certified.

    The active set is usually identified long before the barrier parameter reaches ``t_max``
    (MGDA: after about 2 Newton steps on average instead of about 16), so the loop can stop as
    soon as the exact solution on the guessed support passes :func:`kkt_certified`.
    """

    def finish(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        cand = _support_solution(q, c, lower, x, t, simplex=simplex)
        return cand, kkt_certified(q, c, lower, cand, simplex=simplex)

    return finish


def min_norm_weights(gramian: Tensor) -> Tensor:
    """``argmin_{w in simplex} w^T G w`` in float64 (``G`` already float64, any scale).

    The problem is scale-invariant, so it is solved on ``G / mean(diag G)``: barrier Newton, then
    the exact polish of :func:`polish_quadratic`. ``m = 1`` gives ``[1]``; ``G = 0`` gives the
    uniform weights (every point of the simplex is optimal; the barrier picks its centre).
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
    x, t = barrier_newton(Quadratic(q, c), x0, lower, simplex=True, check_every=2, finish=finish)
    x = polish_quadratic(q, c, lower, x, t, simplex=True)
    return x[0]


# ---------------------------------------------------------------------------------------------
# MGDA
# ---------------------------------------------------------------------------------------------


@register_aggregator("mgda")
class MGDA(GramianWeighting):
    """Multiple-gradient descent: the min-norm element of the convex hull of the task gradients.

    Sener, O. and Koltun, V. "Multi-Task Learning as Multi-Objective Optimization." NeurIPS 2018
    (building on Désidéri's MGDA, 2012). The weights solve

    ``w* = argmin_{w >= 0, sum(w) = 1} w^T G w``,

    so ``d = J^T w*`` is the shortest vector of ``conv{g_1, ..., g_m}``; if ``d != 0`` it has a
    positive inner product ``>= |d|^2`` with every task gradient (KKT:
    ``(G w*)_i >= w*^T G w*``, with equality where ``w*_i > 0``). The paper's Frank-Wolfe solver is
    replaced by an exact one: a float64 log-barrier Newton method on the device, followed by an
    exact solve of the KKT system on the detected support (see :func:`barrier_newton` and
    :func:`polish_quadratic`). Singular Gramians (repeated or zero gradients) and ``m = 1`` are
    handled; an all-zero ``G`` yields uniform weights.

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
