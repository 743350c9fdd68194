"""Small float64 solvers shared by the Gramian weightings (problems over ``m`` task weights).

* :func:`normalized_gramian`, :func:`as_weights`, :func:`solve_small`: the float64, scale-free
  working copy of ``G``, the float32 output convention, and a batched small linear solve.
* :func:`barrier_newton`: a batched log-barrier Newton method with a vectorised line search, for
  a convex objective over ``x >= lower`` (optionally on the simplex); MGDA, CAGrad and UPGrad.
* For quadratic programs, an exact solve of the KKT system on the detected active set (used as a
  certified early exit, :func:`quadratic_finisher`, and as a final polish,
  :func:`polish_quadratic`) and a KKT certificate (:func:`kkt_certified`) that holds every task to
  its own scale.
* :func:`min_norm_point`: Wolfe's exact algorithm for MGDA's problem, a host-side fallback for
  min-norm points too small for the barrier's duality gap.
* :func:`solve_power_balance`: Newton's method for ``(G w)_i = w_i^(-power)``; Nash-MTL, FairGrad.

They run on the device of the Gramian with fixed tensor shapes, so a GPU solve never copies ``G``
to the host; the host synchronises only at the occasional "all converged?" test that lets a loop
stop early (and in ``pinv``). The price on a GPU is kernel-launch latency: measured on one H200
with m <= 40, about 4-7 ms per MGDA call, 5-35 ms per CAGrad call and 12-110 ms per UPGrad call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import as_float64

__all__ = [
    "ConvexObjective",
    "active_set_box_qp",
    "Quadratic",
    "as_weights",
    "barrier_newton",
    "kkt_certified",
    "min_norm_point",
    "normalized_gramian",
    "polish_quadratic",
    "quadratic_finisher",
    "solve_power_balance",
    "solve_small",
]


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise a smooth convex ``F`` subject to ``x >= lower`` (and ``sum(x) = 1`` if ``simplex``).

    A primal log-barrier method: Newton steps on ``t F(x) - sum_i log(x_i - lower_i)`` with ``t``
    multiplied by ``mu`` whenever the iterate is centred (Newton decrement below 0.1), up to
    ``t_max``; at the end the duality gap is about ``m / t_max`` (on the caller's scale; the
    callers normalise their problems to O(1)); random problems with m <= 16 take 10 to 50 Newton
    steps (mean about 16) without an early exit. The equality constraint is handled in the Newton
    system, the line search evaluates 30 step lengths at once (no data-dependent branching), and
    the Hessian is scaled by its diagonal before the solve, which keeps the barrier terms (up to
    ``1/s^2 ~ t^2``) from ruining the conditioning.

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
        ``(x, t, certified)``: the solution ``[B, m]``, the final barrier parameter per problem
        ``[B]`` and which problems were solved exactly by ``finish`` (``[B]`` booleans).
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
        fit = num / torch.where(den > 0, den, torch.ones_like(den))
        t = torch.where((num > 0) & (den > 0), fit, torch.ones_like(den))
        t = t.clamp(1e-2, t_max)
    else:
        t = torch.full((batch,), t0, dtype=dtype, device=device)
    steps_grid = 0.5 ** torch.arange(30, dtype=dtype, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    certified = torch.zeros(batch, dtype=torch.bool, device=device)
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
                certified = certified | ok
            if bool(done.all()):
                break
    return x, t, certified


def _support_solution(
    q: Tensor, c: Tensor, lower: Tensor, x: Tensor, t: Tensor, *, simplex: bool, exact: bool = True
) -> Tensor:
    """Solve the QP's KKT conditions on the support guessed from a barrier iterate.

    At a point of the central path the bound multipliers are ``z_i = 1 / (t s_i)``; a coordinate is
    taken as free when its slack exceeds its multiplier (``s_i^2 t > 1``). With the free set F the
    KKT conditions are linear: ``(Q x + c)_F (+ nu) = 0``, ``x_i = lower_i`` off F (and
    ``sum(x) = 1``). With ``exact`` that symmetric system is solved with a pseudo-inverse
    (``Q_FF`` is singular when gradients repeat); otherwise with an LU solve, which is much cheaper
    on a GPU but gives garbage for a singular system (callers then certify the result).
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
    if exact:
        sol = (torch.linalg.pinv(a, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)[:, :m]
    else:
        sol = solve_small(a, rhs.unsqueeze(-1)).squeeze(-1)[:, :m]
    return torch.where(free & torch.isfinite(sol), sol, lower)


def kkt_certified(q: Tensor, c: Tensor, lower: Tensor, x: Tensor, *, simplex: bool, tol: float = 1e-10) -> Tensor:
    """Whether ``x`` is an optimal solution of the QP (per problem, ``[B]`` booleans).

    Checks the KKT conditions with multipliers computed from ``x``: feasibility, zero (reduced)
    gradient on the free coordinates, non-negative multipliers on the coordinates at their bound.
    Each coordinate's residual is held to its own scale: ``tol`` times ``sqrt(Q_ii x^T Q x) + |c_i|``
    (with ``Q = J J^T`` and ``c = 0`` that is ``|g_i| |J^T x|``, the size of ``g_i . d``), plus the
    float64 round-off of ``(Q x)_i``. A task whose gradient is 1e7 times smaller than the others is
    thus checked as strictly as they are. Since the problem is convex, a point that passes is a
    global minimiser.
    """
    diag = q.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    qx = (q @ x.unsqueeze(-1)).squeeze(-1)
    r = qx + c
    value = (x * qx).sum(-1, keepdim=True).clamp_min(0)
    roundoff = (diag.sqrt() * x.abs()).sum(-1, keepdim=True) * 64 * torch.finfo(q.dtype).eps
    scale = diag.sqrt() * (tol * value.sqrt() + roundoff) + tol * c.abs()
    free = x > lower
    if simplex:
        nu = torch.where(free, r, torch.zeros_like(r)).sum(-1) / free.sum(-1).clamp_min(1)
        r = r - nu[:, None]
        feasible = (x >= 0).all(-1) & ((x.sum(-1) - 1).abs() <= 1e-12)
    else:
        feasible = (x >= lower).all(-1)
    stationary = (torch.where(free, r.abs(), torch.zeros_like(r)) <= scale).all(-1)
    dual = (torch.where(free, torch.zeros_like(r), r) >= -scale).all(-1)
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


def active_set_box_qp(q: Tensor, c: Tensor, lower: Tensor, max_iter: int = 25) -> tuple[Tensor, Tensor]:
    """``min 1/2 x^T Q x + c^T x`` s.t. ``x >= lower`` by the primal-dual active-set method, batched
    (``Q`` ``[B, m, m]``, or one symmetric ``[m, m]`` for every problem; ``c``, ``lower`` ``[B, m]``).

    Hintermueller, Ito and Kunisch, "The primal-dual active set strategy as a semismooth Newton
    method", SIAM J. Optim. 13(3), 2002. Each iteration solves the KKT system with the current
    active set held at its bounds (one small linear solve per problem) and then moves to the active
    set ``{i : lambda_i - (x_i - lower_i) > 0}``: a bound is released when its multiplier turns
    negative, a free coordinate that went below its bound is fixed there. On these small, strictly
    convex problems it stops after a handful of iterations, where a barrier method needs dozens of
    Newton steps. It is not guaranteed to converge for every ``Q``, so it returns a per-problem KKT
    certificate (:func:`kkt_certified`) and the caller falls back to :func:`barrier_newton`.
    Returns ``(x, certified)``.
    """
    batch, m = lower.shape
    shared = q.ndim == 2  # one Q for every problem (UPGrad): Q x for all of them is one matmul

    def grad(x: Tensor) -> Tensor:
        return (x @ q.T if shared else (q @ x.unsqueeze(-1)).squeeze(-1)) + c

    x = lower.clone()
    active = grad(x) > 0  # at the bound with a positive multiplier
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    for _ in range(max_iter):
        free = ~active
        # rows of the free coordinates: (Q x + c)_i = 0; rows of the active ones: x_i = lower_i
        a = torch.where(free[:, :, None], q, eye)
        rhs = torch.where(free, -c, lower)
        sol = solve_small(a, rhs.unsqueeze(-1)).squeeze(-1)
        x = torch.where(free & torch.isfinite(sol), sol, lower)
        new_active = torch.where(free, x < lower, grad(x) > 0)
        if bool((new_active == active).all()):
            break
        active = new_active
    return x, kkt_certified(q.expand(batch, m, m) if shared else q, c, lower, x, simplex=False)


def quadratic_finisher(q: Tensor, c: Tensor, lower: Tensor, *, simplex: bool):  # type: ignore[no-untyped-def]
    """Early exit for :func:`barrier_newton` on a QP: the support solution when KKT-certified.

    The active set is usually identified long before the barrier parameter reaches ``t_max``
    (MGDA: after about 2 Newton steps on average instead of about 16), so the loop can stop as
    soon as the exact solution on the guessed support passes :func:`kkt_certified`.
    """

    def finish(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        cand = _support_solution(q, c, lower, x, t, simplex=simplex, exact=False)
        return cand, kkt_certified(q, c, lower, cand, simplex=simplex)

    return finish


def _affine_min_norm(g: Tensor, support: list[int]) -> Tensor:
    """Weights (summing to 1, zero off ``support``) of the min-norm point of the affine hull of the
    gradients in ``support``, written around the shortest of them, ``g_k``:
    ``d = g_k + sum_j mu_j (g_j - g_k)``. A min-norm point near a tiny gradient is then a small
    correction of it rather than a difference of large terms."""
    m = g.shape[0]
    idx = torch.tensor(support)
    k = int(idx[g.diagonal()[idx].argmin()])
    rest = idx[idx != k]
    y = torch.zeros(m, dtype=g.dtype)
    y[k] = 1.0
    if rest.numel() == 0:
        return y
    gk = g[:, k]
    a = g[rest][:, rest] - gk[rest][:, None] - gk[rest][None, :] + g[k, k]  # (g_i - g_k) . (g_j - g_k)
    b = gk[rest] - g[k, k]  # (g_j - g_k) . g_k
    s = a.diagonal().clamp_min(torch.finfo(g.dtype).tiny).rsqrt()  # Jacobi scaling before the solve
    mu = s * (torch.linalg.pinv(s[:, None] * a * s[None, :], hermitian=True) @ (-b * s))
    y[rest] = mu
    y[k] = 1.0 - mu.sum()
    return y


def min_norm_point(gramian: Tensor, *, tol: float = 1e-10, max_iter: int | None = None) -> Tensor:
    """``argmin_{w in simplex} w^T G w`` by Wolfe's algorithm, in float64 on the host.

    Wolfe, P. "Finding the nearest point in a polytope." Mathematical Programming 11, 1976. It keeps
    a set S of affinely independent gradients and the min-norm point ``d`` of their convex hull; it
    adds the gradient that most violates ``g_j . d >= |d|^2`` (relative to ``|g_j| |d|``, the
    test of :func:`kkt_certified`), moves to the min-norm point of the affine hull of S
    (:func:`_affine_min_norm`), and while that point leaves the convex hull steps back to its
    boundary and drops the gradient whose weight reached 0. It ends after finitely many steps at the
    exact solution (up to round-off), however small ``|d|`` is, where a barrier method's duality gap
    stops at its ``1 / t_max``. One host round trip per step: the fallback of MGDA for the problems
    whose barrier solution fails the KKT certificate.
    """
    device = gramian.device
    g = gramian.detach().to("cpu", torch.float64)
    m = g.shape[0]
    root = g.diagonal().clamp_min(0).sqrt()
    eps = torch.finfo(g.dtype).eps
    k = int(g.diagonal().argmin())
    w = torch.zeros(m, dtype=g.dtype)
    w[k] = 1.0
    support = [k]
    for _ in range(max_iter or 4 * m + 10):
        gw = g @ w
        value = (w * gw).sum().clamp_min(0)
        slack = gw - value
        allowed = root * (tol * value.sqrt() + 64 * eps * (root * w.abs()).sum())
        j = int((slack / root.clamp_min(torch.finfo(g.dtype).tiny)).argmin())
        if slack[j] >= -allowed[j] or j in support:
            break
        support.append(j)
        for _ in range(len(support)):
            y = _affine_min_norm(g, support)
            if bool((y[support] > 0).all()):
                w = y
                break
            # step from w towards y up to the boundary of the hull; drop the weight that reaches 0
            out = torch.tensor([i for i in support if y[i] <= 0])
            ratios = w[out] / (w[out] - y[out]).clamp_min(torch.finfo(g.dtype).tiny)
            theta = ratios.min()
            w = (w + theta * (y - w)).clamp_min(0)
            w[int(out[ratios.argmin()])] = 0.0
            support = [i for i in support if w[i] > 0]
            w = w / w.sum()
        if j not in support:  # the new gradient left at once: no progress is possible in float64
            break
    return w.to(device)


def _h_delta(w: Tensor, dw: Tensor, steps: Tensor, power: float, coef: Tensor) -> Tensor:
    """``sum_i b_i (h(w_i + a dw_i) - h(w_i))`` for each step ``a`` (``[K]``), ``h'(w) = -w^-power``."""
    rel = torch.log1p(steps[:, None] * (dw / w)[None, :])  # log((w + a dw) / w)
    if power == 1.0:
        return -(coef[None, :] * rel).sum(-1)
    return ((coef * w.pow(1.0 - power))[None, :] * torch.expm1((1.0 - power) * rel) / (power - 1.0)).sum(-1)


def solve_power_balance(
    gramian: Tensor,
    power: float,
    init: Tensor | None = None,
    max_iter: int = 20,
    *,
    zero_tol: float = 1e-20,
    ridge: float = 1e-14,
    check_every: int = 5,
) -> tuple[Tensor, Tensor]:
    """Solve ``(G w)_i = w_i^(-power)``, ``w > 0`` (float64, ``G`` normalised to O(1)).

    These are the optimality conditions of the strictly convex problem
    ``min_{w > 0} 1/2 w^T G w + sum_i h(w_i)`` with ``h(w) = -log(w)`` for ``power = 1`` and
    ``h(w) = w^(1 - power) / (power - 1)`` otherwise (``h'(w) = -w^-power``, ``h'' > 0``), so the
    solution is unique and Newton's method on that function converges to it from any positive
    start.

    Scaling: with ``D = diag(sqrt(G_ii))`` the equations are solved for ``y = D w``:
    ``(C y)_i = b_i y_i^(-power)`` with ``C = D^-1 G D^-1`` (unit diagonal, the cosines) and
    ``b_i = D_i^(power - 1)`` (``b = 1`` for Nash-MTL, whose solution is thus covariant with the
    scale of each task). A task whose gradient is 1e7 times smaller than the others is then resolved
    as well as they are, where on ``G`` itself its equation sits below the round-off of the others.
    Each Newton step solves ``(C + diag(power b y^(-power-1))) dy = b y^-power - C y`` (diagonally
    scaled), then takes the best of 30 step lengths (fractions of the largest step that keeps
    ``y > 0``, all evaluated at once, so there is no data-dependent branching on the device).
    For ``power = 1`` the function is self-concordant and the method converges quadratically
    after a few damped steps. The start is rescaled along its ray to the exact 1-D minimiser
    (closed form), which absorbs changes of scale of ``G`` between warm-started calls.

    Degenerate inputs: a task with a zero gradient (``G_ii <= zero_tol * max_j G_jj``) has no
    solution (``w_i -> inf``); it is decoupled and gets weight 0. A tiny ``ridge`` on the diagonal
    of ``C`` (relative to each task's own ``G_ii``, so it never swamps a small task) keeps the
    problem bounded when gradients cancel (e.g. ``g_2 = -g_1``); it perturbs regular solutions by
    about ``ridge * y_i`` in the residual of ``C``.

    Returns:
        ``(w, active)``: the solution (0 for inactive tasks) and the boolean mask of active tasks.
    """
    m = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    sq = gramian.diagonal().clamp_min(0)
    active = sq > zero_tol * sq.max()
    scale = torch.where(active, sq.sqrt(), torch.ones_like(sq))
    both = active[:, None] & active[None, :]
    cos = torch.where(both, gramian / (scale[:, None] * scale[None, :]), torch.zeros_like(gramian))
    cos = cos + torch.diag(torch.where(active, torch.full_like(sq, ridge), torch.ones_like(sq)))
    coef = scale.pow(power - 1.0)
    y = torch.ones(m, dtype=dtype, device=device) if init is None else init.to(device=device, dtype=dtype) * scale
    y = torch.where(torch.isfinite(y) & (y > 0), y, torch.ones_like(y))
    # Exact minimiser along the ray t * y: t^(1 + p) = sum(b y^(1 - p)) / (y^T C y).
    curvature = (y * (cos @ y)).sum()
    y = y * ((coef * y.pow(1.0 - power)).sum() / curvature).pow(1.0 / (1.0 + power))
    steps_grid = 0.5 ** torch.arange(30, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    done = torch.zeros((), dtype=torch.bool, device=device)
    for it in range(max_iter):
        cy = cos @ y
        grad = cy - coef * y.pow(-power)
        hess = cos + torch.diag(power * coef * y.pow(-power - 1.0))
        d = hess.diagonal().clamp_min(tiny).rsqrt()
        sol, _ = torch.linalg.solve_ex(d[:, None] * hess * d[None, :], (-grad * d).unsqueeze(-1))
        dy = d * sol.squeeze(-1)
        dy = torch.where(torch.isfinite(dy), dy, torch.zeros_like(dy))
        lam2 = -(grad * dy).sum()
        ratio = torch.where(dy < 0, -y / dy.clamp(max=-tiny), torch.full_like(y, float("inf")))
        cap = (0.99 * ratio.min()).clamp(max=1.0)
        steps = cap * steps_grid
        value = steps * (cy * dy).sum() + 0.5 * steps.square() * (dy * (cos @ dy)).sum()
        value = value + _h_delta(y, dy, steps, power, coef)
        best = value.argmin(0, keepdim=True)  # gather, not value[best]: indexing with a tensor syncs
        best_value, best_step = value.gather(0, best)[0], steps.gather(0, best)[0]
        # Near the solution (Newton decrement < 0.1) the full step is safe and converges
        # quadratically, while function values no longer resolve the decrease: take it.
        step = torch.where(lam2 < 1e-2, cap, torch.where(best_value < 0, best_step, torch.zeros_like(cap)))
        step = torch.where(done, torch.zeros_like(step), step)
        y = y + step * dy
        done = done | (lam2 < 1e-26) | (step == 0)
        if (it + 1) % check_every == 0 and bool(done):
            break
    return torch.where(active, y / scale, torch.zeros_like(y)), active
