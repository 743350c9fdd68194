"""CAGrad: the best worst-case local improvement in a ball around the average gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights, barrier_newton, normalized_gramian, solve_small
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["CAGrad", "cagrad_weights"]


class _CAGradDual:
    """``F(w) = a^T w + rho sqrt(w^T G w + smoothing)`` with ``a = G b`` (batched, ``B = 1``)."""

    def __init__(self, gramian: Tensor, a: Tensor, rho: Tensor, smoothing: float) -> None:
        self.g, self.a, self.rho, self.smoothing = gramian, a, rho, smoothing

    def _quad(self, x: Tensor) -> Tensor:
        return (x * (x @ self.g)).sum(-1)

    def grad_hess(self, x: Tensor) -> tuple[Tensor, Tensor]:
        gx = x @ self.g  # [B, m] (G symmetric)
        s = (self._quad(x) + self.smoothing).sqrt()  # [B]
        grad = self.a + self.rho * gx / s[:, None]
        hess = self.rho * (self.g / s[:, None, None] - gx[:, :, None] * gx[:, None, :] / s[:, None, None].pow(3))
        return grad, hess

    def delta(self, x: Tensor, dx: Tensor, steps: Tensor) -> Tensor:
        q = self._quad(x)[:, None]
        cross = (dx * (x @ self.g)).sum(-1, keepdim=True)
        curv = (dx * (dx @ self.g)).sum(-1, keepdim=True)
        dq = 2 * steps * cross + steps.square() * curv  # q(x + a dx) - q(x), no cancellation
        s_old = (q + self.smoothing).sqrt()
        s_new = (q + dq + self.smoothing).clamp_min(0).sqrt()
        lin = steps * (self.a * dx).sum(-1, keepdim=True)
        return lin + self.rho * dq / (s_new + s_old)


def _cagrad_support_finisher(gram: Tensor, gb: Tensor, rho: Tensor, tol: float = 1e-10):  # type: ignore[no-untyped-def]
    """Early exit for the barrier solve: the exact dual solution on a guessed support, if certified.

    On a support S (``w_i = 0`` off S) the stationarity conditions of the dual,
    ``(G b)_S + rho (G w)_S / s = nu 1_S`` with ``s = |g_w|``, give
    ``w_S = (s / rho) (nu p - q)`` with ``p = G_SS^-1 1`` and ``q = G_SS^-1 (G b)_S``. With
    ``A = 1^T p``, ``B = 1^T q``, ``C = q^T (G b)_S``, the constraint ``sum(w) = 1`` and the
    definition of ``s`` reduce to ``rho^2 = A nu^2 - 2 B nu + C``, whose larger root gives
    ``s / rho = 1 / sqrt(B^2 - A (C - rho^2))`` and ``w_S = (nu p - q) s / rho``. The candidate is
    accepted only if it passes the KKT test of the dual (``w >= 0``, gradient equal to ``nu`` on S
    and ``>= nu`` off S, to ``tol`` relative to ``max G_ii``).
    """
    m = gram.shape[0]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().max().clamp_min(torch.finfo(gram.dtype).tiny)

    def finish(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        free = x.square() * t[:, None] > 1.0  # slack above its multiplier estimate 1 / (t x)
        both = free[:, :, None] & free[:, None, :]
        sub = torch.where(both, gram, torch.zeros_like(gram))
        sub = sub + torch.where(free[:, :, None], torch.zeros_like(eye), eye)
        ones = free.to(gram.dtype)
        sol = solve_small(sub, torch.stack([ones, gb * ones], dim=-1))  # LU: a singular G_SS fails the test
        sol = torch.where(torch.isfinite(sol), sol, torch.zeros_like(sol))
        p, q = sol[..., 0] * ones, sol[..., 1] * ones
        a, b_, c_ = p.sum(-1), q.sum(-1), (q * gb).sum(-1)
        disc = b_.square() - a * (c_ - rho.square())
        root = disc.clamp_min(0).sqrt()
        nu = (b_ + root) / torch.where(a > 0, a, torch.ones_like(a))
        cand = (nu[:, None] * p - q) / torch.where(root > 0, root, torch.ones_like(root))[:, None]
        norm = (cand * (cand @ gram)).sum(-1).clamp_min(0).sqrt()
        grad = gb + rho * (cand @ gram) / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None]
        on = (cand > 0) & free
        nu_hat = torch.where(on, grad, torch.zeros_like(grad)).sum(-1) / on.sum(-1).clamp_min(1)
        gap = grad - nu_hat[:, None]
        ok = (disc > 0) & (a > 0) & (norm > 0) & on.any(-1)
        ok = ok & (cand >= 0).all(-1) & ((cand.sum(-1) - 1).abs() <= 1e-10)
        ok = ok & (torch.where(on, gap.abs(), torch.zeros_like(gap)).amax(-1) <= tol * scale)
        ok = ok & (torch.where(on, torch.zeros_like(gap), gap).amin(-1) >= -tol * scale)
        return cand.clamp_min(0), ok

    return finish


def cagrad_weights(gramian: Tensor, c: float, rescale: int = 1, smoothing: float = 1e-14) -> Tensor:
    """CAGrad weights ``x`` (float64 ``[m]``) with ``d = J^T x``; ``gramian`` float64.

    Solves the dual ``min_{w in simplex} g_w . g_0 + sqrt(phi) |g_w|`` with
    ``g_w = J^T w``, ``g_0 = J^T b`` (``b = 1/m``) and ``phi = c^2 |g_0|^2`` by the barrier Newton
    method of :func:`~lightning_mtl.aggregators._solvers.barrier_newton` (on ``G`` normalised to
    mean diagonal 1; the solution is scale-invariant), which stops early once the closed-form solution
    on the detected support is certified optimal (:func:`_cagrad_support_finisher`), then returns
    ``x = b + (sqrt(phi) / |g_w|) w``, divided by ``1 + c^2`` (``rescale=1``) or ``1 + c``
    (``rescale=2``). ``smoothing`` is added under the square root (the dual is not differentiable
    where ``g_w = 0``, which happens when 0 is in the convex hull of the gradients).
    """
    m = gramian.shape[0]
    b = torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    if c == 0.0:
        return b
    g_n, _ = normalized_gramian(gramian)
    gb = g_n @ b
    rho = c * (b @ gb).clamp_min(0).sqrt()
    if m == 1:
        w = torch.ones(1, dtype=g_n.dtype, device=g_n.device)
    else:
        objective = _CAGradDual(g_n, gb.unsqueeze(0), rho, smoothing)
        x0 = b.unsqueeze(0)
        finish = _cagrad_support_finisher(g_n, gb.unsqueeze(0), rho)
        w, _, _ = barrier_newton(objective, x0, torch.zeros_like(x0), simplex=True, check_every=2, finish=finish)
        w = w[0]
    norm_w = (w @ g_n @ w + smoothing).sqrt()
    x = b + (rho / norm_w) * w
    if rescale == 1:
        x = x / (1.0 + c**2)
    elif rescale == 2:
        x = x / (1.0 + c)
    return x


@register_aggregator("cagrad")
class CAGrad(GramianWeighting):
    """Conflict-averse gradient descent.

    Liu, B., Liu, X., Jin, X., Stone, P. and Liu, Q. "Conflict-Averse Gradient Descent for
    Multi-task Learning." NeurIPS 2021.

    The update maximises the worst local improvement of the tasks within a ball around the average
    gradient ``g_0``: ``max_d min_i g_i . d`` s.t. ``|d - g_0| <= c |g_0|``. Its dual is a problem
    on the simplex, ``min_w g_w . g_0 + c |g_0| |g_w|``, and ``d = g_0 + (c |g_0| / |g_w|) g_w``.
    With ``c = 0`` the update is exactly the mean gradient; as ``c`` grows it approaches MGDA.

    Solver: the official code (and LibMTL) solve the dual with ``scipy.optimize.minimize``
    (SLSQP) on the host. Here it is solved in float64 on the device with a log-barrier Newton
    method (exact gradient and Hessian of the dual, vectorised line search), which stops as soon as
    the closed-form solution on the detected support passes the dual's KKT test, or else at a
    duality gap of about 1e-12 on the normalised Gramian; no host round trip is needed.

    When 0 is in the convex hull of the task gradients (a Pareto-stationary point) the dual optimum
    can have ``g_w = 0`` and the closed form of ``d`` degenerates; as in the official code (which
    adds a small constant to ``|g_w|``) the result is then close to the mean gradient.

    Args:
        c: radius of the ball relative to ``|g_0|`` (``alpha``/``calpha`` in the official code and
            LibMTL). Default 0.4, used for NYUv2/CityScapes in the paper and by Nash-MTL's
            baselines; LibMTL's default is 0.5.
        rescale: ``0`` returns ``d``; ``1`` (official default) returns ``d / (1 + c^2)``; ``2``
            returns ``d / (1 + c)``.
    """

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        super().__init__()
        if c < 0:
            raise ValueError(f"CAGrad c must be >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ValueError(f"CAGrad rescale must be 0, 1 or 2, got {rescale}")
        self.c = float(c)
        self.rescale = int(rescale)

    def forward(self, gramian: Tensor) -> Tensor:
        g = gramian.detach().to(torch.float64)
        return as_weights(cagrad_weights(g, self.c, self.rescale), gramian)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"c": self.c, "rescale": self.rescale}
