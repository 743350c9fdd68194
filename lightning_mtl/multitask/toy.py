"""The two-objective toy problem of CAGrad, reused by Nash-MTL and FAMO, with its exact Pareto set.

References:
    * Liu, B., Liu, X., Jin, X., Stone, P. and Liu, Q. "Conflict-Averse Gradient Descent for
      Multi-task Learning." NeurIPS 2021, Figure 1 and appendix; official code
      ``github.com/Cranial-XIX/CAGrad``, ``toy.py`` (class ``Toy``).
    * Navon, A. et al. "Multi-Task Learning as a Bargaining Game." ICML 2022, Figure 1; official
      code ``github.com/AvivNavon/nash-mtl``, ``experiments/toy/problem.py`` and ``trainer.py``:
      the same losses with the first one multiplied by ``scale = 0.1`` (imbalanced losses).
    * Liu, B., Feng, Y., Stone, P. and Liu, Q. "FAMO: Fast Adaptive Multitask Optimization."
      NeurIPS 2023; official code ``github.com/Cranial-XIX/FAMO``, ``experiments/toy``: the
      Nash-MTL set-up, with FAMO working on ``log(L_i - L_i^min)``, ``L^min = (-21 scale, -21)``.

Nothing here depends on Lightning; it is used by ``tests/aggregators/test_toy_problem.py`` and
``examples/toy_trajectories.py``.

The losses
----------
For ``x = (x1, x2)``, with ``s+(x2) = max(tanh(x2 / 2), 0)`` and ``s-(x2) = max(tanh(-x2 / 2), 0)``
(exactly one of them is non-zero off the axis ``x2 = 0``)::

    f1 = log(max(|-(x1 + 7) / 2 + tanh(x2)|, 5e-6)) + 6      q1 = ((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    f2 = log(max(|-(x1 - 7) / 2 - tanh(x2)|, 5e-6)) + 6      q2 = ((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20

    L1 = scale * (s+ f1 + s- q1)                              L2 = s+ f2 + s- q2

(in the official code ``f1`` is written ``log|0.5 (-x1 - 7) - tanh(-x2)|`` and ``f2``
``log|0.5 (-x1 + 3) + tanh(-x2) + 2|``; these are the same functions). ``scale = 1`` is CAGrad's
problem, ``scale = 0.1`` the Nash-MTL/FAMO one. Above the axis the losses are log-barrier-like
valleys (``L1`` has a sharp valley along ``x1 = 2 tanh(x2) - 7``, ``L2`` along
``x1 = 7 - 2 tanh(x2)``) and ``L_i >= log(5e-6) + 6 > -6.21``; below it they are quadratic bowls
damped by ``tanh``, with minima near ``(7, -8.43)`` (``L1``) and ``(-7, -8.43)`` (``L2``) of value
about ``-20``. :func:`log_losses` gives ``log(L_i - L_i^min)`` with FAMO's lower bounds
(``L1 > -20 scale``, ``L2 > -20``): a monotone transform per task, so the Pareto set is the same.

The Pareto set
--------------
The curve ``{(x1, y(x1)) : -7 <= x1 <= 7}``, with ``y(x1)`` the single root in ``(-12, -8)`` of the
stationarity condition, found by bisection in float64 (:func:`pareto_x2`): ``y(0) = -8.3551``,
``y(+-7) = -8.4345``, the same for every ``scale``. The derivation is on the documentation's
multi-task page (section "The toy problem"); the tests check it numerically.

Optimisation
------------
:func:`optimize` follows the official scripts: the point is the only parameter of an Adam
optimiser (learning rate ``1e-3``, betas ``(0.9, 0.999)`` by default), and at every step the
2 x 2 Jacobian (rows = task gradients) is computed by autograd and replaced by the method's
direction. The papers run 100,000 steps (CAGrad), 35,000 (Nash-MTL) or 50,000 (FAMO) from the
start points in :data:`START_POINTS`; :data:`QUICK_PROTOCOL` is a 150-step stand-in for tests.
Not reproduced: the official Nash-MTL code clips the direction to norm 1 before Adam (a trainer
setting in this library); Adam makes the update nearly independent of such a rescaling.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import Aggregator
from lightning_mtl.multitask.engine import GradientEngine

__all__ = [
    "ALL_START_POINTS",
    "LOG_LOWER",
    "NASH_MTL_SCALE",
    "PAPER_LR",
    "PAPER_STEPS",
    "QUICK_PROTOCOL",
    "START_POINTS",
    "distance_to_pareto_set",
    "log_losses",
    "loss_lower_bounds",
    "losses",
    "optimize",
    "pareto_front",
    "pareto_set",
    "pareto_x2",
    "uses_log_losses",
]

LOG_LOWER = 5e-6
"""Clamp inside the logarithms of the losses (``LOWER`` in the official code)."""

NASH_MTL_SCALE = 0.1
"""Factor on the first loss in the Nash-MTL and FAMO toy experiments (``--scale`` default)."""

PAPER_LR = 1e-3
"""Adam learning rate of all three official toy scripts."""

PAPER_STEPS = {"cagrad": 100_000, "nashmtl": 35_000, "famo": 50_000}
"""Number of Adam steps of each official toy script."""

START_POINTS = {
    "cagrad": ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)),
    "nashmtl": ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)),
}
"""Start points of the official toy scripts (FAMO uses the Nash-MTL ones)."""

ALL_START_POINTS = ((-8.5, 7.5), (-8.5, -5.0), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
"""The union of :data:`START_POINTS`."""

QUICK_PROTOCOL = {"steps": 150, "lr": 0.8, "lr_final": 1e-3, "betas": (0.5, 0.9)}
"""A short protocol for tests and quick figures (**not** the papers'): 150 Adam steps, learning
rate decayed from 0.8 to 1e-3 by a cosine, betas ``(0.5, 0.9)``. The papers' protocol
(``lr = 1e-3``, betas ``(0.9, 0.999)``, 35,000 to 100,000 steps) costs 200 to 700 times more
aggregator calls. The large steps jump over the narrow logarithmic valleys above the axis, so
even plain gradient descent reaches the Pareto set here; what it checks is that a method's
fixed points lie on the Pareto set and that it gets there, not the papers' finding that some
methods stall in those valleys."""

_X1_RANGE = 7.0  # the Pareto set spans x1 in [-7, 7]


def _at_least(v: Tensor, low: float) -> Tensor:
    """``max(v, low)`` whose gradient is that of ``v`` where ``v == low`` (subgradient 1).

    This is what ``torch.clamp`` did when the official toy scripts were written (PyTorch 0.4 to
    2.x); recent releases give 0 at the bound instead. It matters at ``x2 = 0``: with 0 both task
    gradients vanish on the whole axis and Nash-MTL's start point ``(0, 0)`` could never move.
    """
    return torch.where(v >= low, v, torch.full_like(v, low))


def losses(x: Tensor, scale: float = 1.0) -> Tensor:
    """``(L1, L2)`` at the points ``x`` (shape ``[..., 2]``); returns ``[..., 2]``. Differentiable."""
    x1, x2 = x[..., 0], x[..., 1]
    t = torch.tanh(x2)
    f1 = _at_least((-0.5 * (x1 + 7.0) + t).abs(), LOG_LOWER).log() + 6.0
    f2 = _at_least((-0.5 * (x1 - 7.0) - t).abs(), LOG_LOWER).log() + 6.0
    tail = 0.1 * (x2 + 8.0).square()
    q1 = ((x1 - 7.0).square() + tail) / 10.0 - 20.0
    q2 = ((x1 + 7.0).square() + tail) / 10.0 - 20.0
    s_up = _at_least(torch.tanh(0.5 * x2), 0.0)
    s_down = _at_least(torch.tanh(-0.5 * x2), 0.0)
    l1 = scale * (s_up * f1 + s_down * q1)
    l2 = s_up * f2 + s_down * q2
    return torch.stack([l1, l2], dim=-1)


def loss_lower_bounds(scale: float = 1.0) -> tuple[float, float]:
    """FAMO's lower bounds ``(-21 scale, -21)``: ``L_i`` is always above them (``L_i > -20``)."""
    return (-21.0 * scale, -21.0)


def log_losses(x: Tensor, scale: float = 1.0) -> Tensor:
    """``log(L_i - L_i^min)`` with :func:`loss_lower_bounds` (FAMO's toy; DB-MTL's log losses).

    The toy losses are negative, so the plain ``log L_i`` of DB-MTL or FAMO is undefined; the FAMO
    code shifts them by these bounds. Each is a monotone transform of one loss: same Pareto set.
    """
    low = torch.tensor(loss_lower_bounds(scale), dtype=x.dtype, device=x.device)
    return (losses(x, scale) - low).log()


def uses_log_losses(aggregator: Aggregator) -> bool:
    """Whether the method expects the Jacobian of the log-losses (DB-MTL's ``uses_log_losses``)."""
    return aggregator.uses_log_losses


def pareto_x2(x1: Tensor | float, iterations: int = 80) -> Tensor:
    """``y(x1)``: the second coordinate of the Pareto-set point with first coordinate ``x1``.

    The root in ``(-12, -8)`` of ``h'`` (see the module docstring), by bisection in float64
    (``80`` halvings of an interval of length 4 reach float64 resolution). Meaningful for
    ``|x1| <= 7``; the formula is evaluated for any ``x1``.
    """
    x1 = torch.as_tensor(x1, dtype=torch.float64)
    c = -15.1 - 0.1 * x1.square()
    lo = torch.full_like(x1, -12.0)
    hi = torch.full_like(x1, -8.0)
    for _ in range(iterations):
        t = 0.5 * (lo + hi)
        s = torch.tanh(-0.5 * t)
        slope = -0.5 * (1.0 - s.square()) * (c + 0.01 * (t + 8.0).square()) + 0.02 * s * (t + 8.0)
        up = slope > 0  # h increasing at t: the minimiser is to the left
        hi = torch.where(up, t, hi)
        lo = torch.where(up, lo, t)
    return 0.5 * (lo + hi)


def pareto_set(num: int = 1001) -> Tensor:
    """``num`` points of the Pareto set, ``x1`` evenly spaced in ``[-7, 7]``: ``[num, 2]`` float64."""
    x1 = torch.linspace(-_X1_RANGE, _X1_RANGE, num, dtype=torch.float64)
    return torch.stack([x1, pareto_x2(x1)], dim=-1)


def pareto_front(num: int = 1001, scale: float = 1.0) -> Tensor:
    """The Pareto front: :func:`losses` on :func:`pareto_set`, ``[num, 2]``."""
    return losses(pareto_set(num), scale)


@functools.lru_cache(maxsize=1)
def _dense_pareto_set() -> Tensor:
    # spacing 1.4e-4 in x1: a point at distance d from the curve is measured with an error below
    # sqrt(d^2 + 7e-5^2) - d, i.e. 7e-5 at worst (on the curve) and negligible beyond
    return pareto_set(100_001)


def distance_to_pareto_set(points: Tensor) -> Tensor:
    """Euclidean distance of each point (``[..., 2]``) to the Pareto set; float64 ``[...]``.

    Computed against a dense sampling of the curve (error below ``1e-4``), endpoints included, so
    a point beyond ``|x1| = 7`` is measured to the nearest endpoint.
    """
    curve = _dense_pareto_set()
    p = points.detach().to(torch.float64).reshape(-1, 2)
    out = torch.empty(p.shape[0], dtype=torch.float64)
    for start in range(0, p.shape[0], 256):  # bounded memory for long trajectories
        chunk = p[start : start + 256]
        out[start : start + 256] = torch.cdist(chunk, curve).amin(dim=1)
    return out.reshape(points.shape[:-1])


def _row_norms(jacobian: Tensor, b: int) -> Tensor:
    """Point b's task-gradient norms (GradNorm's input)."""
    return jacobian[b].norm(dim=-1)


def _shifted_losses(point: Tensor, scale: float, lower: Tensor) -> Tensor:
    """The losses at ``point``, shifted to be positive as the loss weightings see them."""
    return losses(point, scale) - lower


def _row(values: Callable[[], Tensor], b: int) -> Tensor:
    """Point b's entry of a lazily computed batch of values."""
    return values()[b]


def _identity(t: Tensor) -> Tensor:
    return t


def optimize(
    aggregator: Aggregator,
    start: Tensor | Sequence[float] | Sequence[Sequence[float]],
    steps: int,
    lr: float = PAPER_LR,
    *,
    scale: float = 1.0,
    log: bool | None = None,
    lr_final: float | None = None,
    method_lr: float = 0.025,
    betas: tuple[float, float] = (0.9, 0.999),
) -> Tensor:
    """Adam on the toy problem driven by ``aggregator``; returns the trajectory.

    Args:
        aggregator: any registered method. Gramian and Jacobian methods get the ``2 x 2`` Jacobian
            ``J`` (rows = task gradients, by autograd) and give the direction ``aggregate(J)``.
            For a loss weighting (``kind == "loss"``) the direction is the gradient of
            ``aggregator(losses)``, fed with the shifted losses ``L_i - L_i^min > 0``
            (:func:`loss_lower_bounds`; same gradients, but DWA, GradNorm, FAMO, ... assume
            positive losses), with ``grad_norms = |grad L_i|`` for a method that
            ``needs_grad_norms`` (the point is the "last shared layer"). The aggregator is
            deep-copied once per start point, so every problem has its own state (Nash-MTL's
            warm start, GradVac's targets, FAMO's logits, ...) and the caller's instance is left
            untouched. Each copy gets a :class:`~lightning_mtl.multitask.engine.GradientEngine`,
            which calls the hooks as in training: ``bind_tasks``
            once, ``after_step`` after every step (with the shifted losses before and after the
            step when ``needs_losses_after_step``, as FAMO's toy trainer does) and
            ``on_train_epoch_end`` after every step (one step is one "epoch": DWA). Learnable
            parameters of the method (uncertainty weighting, GradNorm) are trained by the same
            Adam with learning rate ``method_lr``.
        start: one point ``[2]`` or a batch ``[B, 2]`` of start points, run as ``B`` independent
            problems in one Adam tensor (Adam is element-wise, so this is exactly ``B`` separate
            runs).
        steps: number of Adam steps.
        lr: Adam learning rate of the point (``1e-3`` in the papers).
        scale: factor on ``L1`` (``1`` for CAGrad, :data:`NASH_MTL_SCALE` for Nash-MTL / FAMO).
        log: give gradient methods the Jacobian of :func:`log_losses` instead of that of
            :func:`losses`; ``None`` follows the method's ``uses_log_losses`` flag (DB-MTL).
        lr_final: if given, the learning rate of the point decays from ``lr`` to ``lr_final`` by
            a cosine schedule (not in the papers; it lets short runs settle, e.g. in tests).
        method_lr: learning rate of the method's own parameters (the Nash-MTL/FAMO toy
            scripts' ``--method-params-lr`` default).
        betas: Adam's betas (PyTorch's defaults in the papers). The gradients of the logarithmic
            valleys above the axis can reach ``1e5``; with ``beta2 = 0.999`` such a spike slows
            the following steps down for thousands of iterations, one reason the papers need
            35,000 to 100,000 steps. A short run (a test) can use a smaller ``beta2``.

    Returns:
        float64 trajectory ``[steps + 1, 2]`` (``[steps + 1, B, 2]`` for a batch of start points),
        the start point first.
    """
    x0 = torch.as_tensor(start, dtype=torch.float64).detach().clone()
    single = x0.dim() == 1
    x = x0.reshape(-1, 2).clone().requires_grad_(True)
    batch = x.shape[0]
    copies = [copy.deepcopy(aggregator) for _ in range(batch)]
    for agg in copies:
        agg.bind_tasks(("L1", "L2"))
    # one engine per problem: the same dispatch on the method's kind and flags as in training
    engines = [GradientEngine(agg) for agg in copies]
    engine = engines[0]
    log = uses_log_losses(aggregator) if log is None else bool(log)
    lower = torch.tensor(loss_lower_bounds(scale), dtype=torch.float64)
    groups: list[dict] = [{"params": [x], "lr": lr}]
    method_params = [p for agg in copies for p in agg.parameters() if p.requires_grad]
    if method_params:
        groups.append({"params": method_params, "lr": method_lr})
    optimizer = torch.optim.Adam(groups, betas=betas)
    trajectory = torch.empty(steps + 1, batch, 2, dtype=torch.float64)
    trajectory[0] = x.detach()
    for step in range(steps):
        if lr_final is not None:
            frac = step / max(steps - 1, 1)
            optimizer.param_groups[0]["lr"] = lr_final + 0.5 * (lr - lr_final) * (1.0 + math.cos(math.pi * frac))
        optimizer.zero_grad(set_to_none=True)
        objectives = log_losses(x, scale) if (log and engine.uses_gradients) else losses(x, scale)  # [B, 2]
        jacobian = torch.empty(0)
        if engine.needs_jacobian:
            rows = [torch.autograd.grad(objectives[:, i].sum(), x, retain_graph=True)[0] for i in range(2)]
            jacobian = torch.stack(rows, dim=1)  # [B, tasks, 2]: point b only enters its own losses
        before = losses(trajectory[step], scale) - lower  # loss weightings see losses shifted to > 0
        for b, eng in enumerate(engines):
            eng.start_step()
            eng.record_losses(before[b])
        if engine.uses_gradients:
            x.grad = torch.stack([eng.direction(jacobian[b]) for b, eng in enumerate(engines)]).to(x.dtype)
        else:
            shifted = objectives - lower  # same gradients as the losses
            total = objectives.new_zeros(())
            for b, eng in enumerate(engines):
                total = total + eng.objective(shifted[b], functools.partial(_row_norms, jacobian, b))
            total.backward()  # fills x.grad and the grads of the method's parameters
        optimizer.step()
        trajectory[step + 1] = x.detach()
        after = functools.cache(functools.partial(_shifted_losses, trajectory[step + 1], scale, lower))  # FAMO's only
        for b, eng in enumerate(engines):
            eng.after_step(functools.partial(_row, after, b))
            eng.on_train_epoch_end(_identity)
    return trajectory[:, 0] if single else trajectory
