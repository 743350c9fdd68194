"""Nash-MTL: task weights from the Nash bargaining solution, ``G a = 1 / a``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.gradvac import resize_lazy_buffers
from lightning_mtl.aggregators.mgda import as_weights
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["NashMTL", "solve_power_balance"]


def _h_delta(w: Tensor, dw: Tensor, steps: Tensor, power: float) -> Tensor:
    """``sum_i h(w_i + a dw_i) - h(w_i)`` for each step ``a`` (``[K]``), ``h' (w) = -w^-power``."""
    rel = torch.log1p(steps[:, None] * (dw / w)[None, :])  # log((w + a dw) / w)
    if power == 1.0:
        return -rel.sum(-1)
    return (w.pow(1.0 - power)[None, :] * torch.expm1((1.0 - power) * rel) / (power - 1.0)).sum(-1)


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
    start. Each step solves ``(G + diag(power w^(-power-1))) dw = w^-power - G w`` (diagonally
    scaled), then takes the best of 30 step lengths (fractions of the largest step that keeps
    ``w > 0``, all evaluated at once, so there is no data-dependent branching on the device).
    For ``power = 1`` the function is self-concordant and the method converges quadratically
    after a few damped steps. The start is rescaled along its ray to the exact 1-D minimiser
    (closed form), which absorbs changes of scale of ``G`` between warm-started calls.

    Degenerate inputs: a task with a zero gradient (``G_ii <= zero_tol * max_j G_jj``) has no
    solution (``w_i -> inf``); it is decoupled and gets weight 0. A tiny ``ridge`` on the diagonal
    keeps the problem bounded when gradients cancel (e.g. ``g_2 = -g_1``); it perturbs regular
    solutions by about ``ridge * w_i`` in the residual.

    Returns:
        ``(w, active)``: the solution (0 for inactive tasks) and the boolean mask of active tasks.
    """
    m = gramian.shape[0]
    dtype, device = gramian.dtype, gramian.device
    sq = gramian.diagonal().clamp_min(0)
    active = sq > zero_tol * sq.max()
    both = active[:, None] & active[None, :]
    g = torch.where(both, gramian, torch.zeros_like(gramian))
    g = g + torch.diag(torch.where(active, torch.full_like(sq, ridge), torch.ones_like(sq)))
    w = torch.ones(m, dtype=dtype, device=device) if init is None else init.to(device=device, dtype=dtype)
    w = torch.where(torch.isfinite(w) & (w > 0), w, torch.ones_like(w))
    # Exact minimiser along the ray t * w: t^(1 + p) = sum(w^(1 - p)) / (w^T G w).
    curvature = (w * (g @ w)).sum()
    w = w * (w.pow(1.0 - power).sum() / curvature).pow(1.0 / (1.0 + power))
    steps_grid = 0.5 ** torch.arange(30, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    done = torch.zeros((), dtype=torch.bool, device=device)
    for it in range(max_iter):
        gw = g @ w
        grad = gw - w.pow(-power)
        hess = g + torch.diag(power * w.pow(-power - 1.0))
        d = hess.diagonal().clamp_min(tiny).rsqrt()
        sol, _ = torch.linalg.solve_ex(d[:, None] * hess * d[None, :], (-grad * d).unsqueeze(-1))
        dw = d * sol.squeeze(-1)
        dw = torch.where(torch.isfinite(dw), dw, torch.zeros_like(dw))
        lam2 = -(grad * dw).sum()
        ratio = torch.where(dw < 0, -w / dw.clamp(max=-tiny), torch.full_like(w, float("inf")))
        cap = (0.99 * ratio.min()).clamp(max=1.0)
        steps = cap * steps_grid
        value = steps * (gw * dw).sum() + 0.5 * steps.square() * (dw * (g @ dw)).sum()
        value = value + _h_delta(w, dw, steps, power)
        best = value.argmin(0, keepdim=True)  # gather, not value[best]: indexing with a tensor syncs
        best_value, best_step = value.gather(0, best)[0], steps.gather(0, best)[0]
        # Near the solution (Newton decrement < 0.1) the full step is safe and converges
        # quadratically, while function values no longer resolve the decrease: take it.
        step = torch.where(lam2 < 1e-2, cap, torch.where(best_value < 0, best_step, torch.zeros_like(cap)))
        step = torch.where(done, torch.zeros_like(step), step)
        w = w + step * dw
        done = done | (lam2 < 1e-26) | (step == 0)
        if (it + 1) % check_every == 0 and bool(done):
            break
    return torch.where(active, w, torch.zeros_like(w)), active


@register_aggregator("nashmtl", "nash_mtl")
class NashMTL(GramianWeighting):
    """Multi-task learning as a bargaining game (Nash-MTL).

    Navon, A., Shamsian, A., Achituve, I., Maron, H., Kawaguchi, K., Chechik, G. and Fetaya, E.
    "Multi-Task Learning as a Bargaining Game." ICML 2022.

    The Nash bargaining solution over the update direction is ``d = sum_i a_i g_i`` with ``a > 0``
    solving ``(G a)_i = 1 / a_i``, i.e. ``g_i . d = 1 / a_i`` for every task. Following the official
    code, ``G`` is first normalised by its Frobenius norm; ``a`` then solves the equations for
    ``G / |G|_F`` (scaling ``G`` by ``s`` scales ``a`` by ``1 / sqrt(s)``: the direction is the
    same, and ``|J^T a|^2 = m |G|_F``).

    Solver: the official code runs up to ``optim_niter`` concave-convex (CCCP) iterations, each a
    cvxpy/ECOS problem. Here ``a`` is the unique minimiser of the strictly convex
    ``1/2 a^T G a - sum_i log a_i``, found by Newton's method with a vectorised line search in
    float64 on the device (:func:`solve_power_balance`), ``optim_niter`` Newton steps at most,
    warm-started from the previous ``a`` (rescaled to the new Gramian). A task with a zero
    gradient gets weight 0 (the bargaining problem has no solution for it).

    The official recipe also clips the shared gradients at ``max_norm = 1.0`` after the backward
    pass; that is a trainer setting here (``Trainer(gradient_clip_val=1.0)``, norm clipping), not
    part of the weighting.

    State: the last weights are the buffer ``alpha`` (created at the first call) and the step
    counter is extra state, so both are in checkpoints; resuming reproduces the run.

    Args:
        update_weights_every: recompute the weights every this many calls and reuse the last ones
            in between (official default 1).
        optim_niter: maximum number of Newton steps per solve (official default 20, there the
            number of CCCP iterations).
    """

    def __init__(self, update_weights_every: int = 1, optim_niter: int = 20) -> None:
        super().__init__()
        if update_weights_every < 1:
            raise ValueError(f"update_weights_every must be >= 1, got {update_weights_every}")
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.step_count = 0
        self.register_buffer("alpha", torch.zeros(0, dtype=torch.float64))

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        stale = self.alpha.shape != (m,)
        if stale or self.step_count % self.update_weights_every == 0:
            g = gramian.detach().to(torch.float64)
            g = 0.5 * (g + g.T)
            norm = torch.linalg.matrix_norm(g)
            g = g / torch.where(norm > 0, norm, torch.ones_like(norm))
            init = None if stale else self.alpha.to(g.device).clone()
            if init is not None:
                init = torch.where(init > 0, init, torch.ones_like(init))
            alpha, _ = solve_power_balance(g, 1.0, init, self.optim_niter)
            if stale:
                self.alpha = alpha
            else:
                self.alpha.copy_(alpha)
        self.step_count += 1
        return as_weights(self.alpha, gramian)

    def get_extra_state(self) -> Any:
        return {"step_count": self.step_count}

    def set_extra_state(self, state: Any) -> None:
        self.step_count = int(state["step_count"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        resize_lazy_buffers(self, state_dict, prefix, ["alpha"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"update_weights_every": self.update_weights_every, "optim_niter": self.optim_niter}
