"""Nash-MTL: task weights from the Nash bargaining solution, ``G a = 1 / a``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights, solve_power_balance
from lightning_mtl.aggregators._state import resize_lazy_buffers
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["NashMTL"]


@register_aggregator("nashmtl", "nash_mtl")
class NashMTL(GramianWeighting):
    """Multi-task learning as a bargaining game (Nash-MTL).

    Navon, A., Shamsian, A., Achituve, I., Maron, H., Kawaguchi, K., Chechik, G. and Fetaya, E.
    "Multi-Task Learning as a Bargaining Game." ICML 2022.

    The Nash bargaining solution over the update direction is ``d = sum_i a_i g_i`` with ``a > 0``
    solving ``(G a)_i = 1 / a_i``, i.e. ``g_i . d = 1 / a_i`` for every task (Eq. 3), so
    ``|d|^2 = a^T G a = m`` whatever the scale of the gradients, and ``d(c J) = d(J)``. As in the
    official code, the equations are solved for ``G / |G|_F`` and the weights mapped back: there
    the constraint of each convex step multiplies by the normalisation factor again, here the
    solution ``a_n`` for ``G / s`` gives ``a = a_n / sqrt(s)``.

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

    # buffers, registered in __init__ (declared here for the type checker)
    alpha: Tensor

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
            alpha = alpha / torch.where(norm > 0, norm, torch.ones_like(norm)).sqrt()  # back to the raw G
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
