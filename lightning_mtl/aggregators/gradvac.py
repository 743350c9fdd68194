"""GradVac: move each task gradient towards an adaptive (EMA) target cosine with the others."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.aggregators._solvers import as_weights, normalized_gramian
from lightning_mtl.aggregators._state import SeededOrders, resize_lazy_buffers
from lightning_mtl.aggregators.base import GramianWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["GradVac", "gradvac_coefficients"]


def gradvac_coefficients(
    gramian: Tensor, orders: Tensor, phi_hat: Tensor, beta: float, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """GradVac on the Gramian; returns ``(C, phi_hat_new)`` with ``g_i' = sum_l C[i, l] g_l``.

    Args:
        gramian: float64 ``[m, m]``, normalised to O(1) (``eps`` is absolute).
        orders: ``[m, m - 1]`` visiting orders (see :func:`~lightning_mtl.aggregators._state.sample_orders`).
        phi_hat: float64 ``[m, m]`` EMA targets ``phi_hat[i, j]``; not modified.
        beta: EMA rate.

    For task ``i`` visiting ``j``: ``phi = cos(g_i', g_j)`` from ``|g_i'|^2 = c_i G c_i^T`` and
    ``g_i' . g_j = (c_i G)_j``; if ``phi < phi_hat[i, j]``, ``g_i' += a g_j`` with
    ``a = |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2))``,
    which makes the cosine exactly ``phi_hat``; then, whether or not it corrected,
    ``phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi`` (Algorithm 1 of the paper).
    """
    m = gramian.shape[0]
    coef = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    phi_hat = phi_hat.clone()
    if m == 1:
        return coef, phi_hat
    rows = torch.arange(m, device=gramian.device)
    orders = orders.to(gramian.device)
    norms = gramian.diagonal().clamp_min(0).sqrt()
    for k in range(m - 1):
        j = orders[:, k]
        norm_i = ((coef @ gramian) * coef).sum(1).clamp_min(0).sqrt()
        norm_j = norms.index_select(0, j)
        inner = (coef * gramian.index_select(1, j).T).sum(1)
        phi = inner / (norm_i * norm_j + eps)
        target = phi_hat[rows, j]
        root_phi = (1 - phi.square()).clamp_min(0).sqrt()
        root_target = (1 - target.square()).clamp_min(0).sqrt()
        step = norm_i * (target * root_phi - phi * root_target) / (norm_j * root_target + eps)
        step = torch.where(phi < target, step, torch.zeros_like(step))
        coef = coef.index_put((rows, j), step, accumulate=True)
        phi_hat = phi_hat.index_put((rows, j), (1 - beta) * target + beta * phi)
    return coef, phi_hat


@register_aggregator("gradvac")
class GradVac(SeededOrders, GramianWeighting):
    """Gradient Vaccine: align task gradients towards adaptive target similarities.

    Wang, Z., Tsvetkov, Y., Firat, O. and Cao, Y. "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models." ICLR 2021 (Algorithm 1, Eq. 2-3).

    Like PCGrad, each ``g_i'`` visits the other tasks in a random order, but instead of only
    removing negative similarity it raises ``cos(g_i', g_j)`` to the target ``phi_hat_ij`` whenever
    it is below it (Eq. 2, a multiple of the original ``g_j`` is added). The targets are EMAs of
    the observed cosines, ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij``, initialised to 0
    (so the first step is PCGrad). The update is ``sum_i g_i'``. Everything runs on the Gramian
    (the correction is a change of one coefficient of ``g_i'`` in the basis of the ``g_l``).

    Notes:
        * The paper updates the EMA after every visited pair, whether or not a correction was made
          (Algorithm 1); LibMTL updates it only when a correction happens. We follow the paper.
        * The paper keeps one target per pair *and per layer/parameter group*; this version keeps
          one per pair for the whole Jacobian the engine passes (LibMTL's "whole_model" mode).
        * The EMA targets are the buffer ``phi_hat`` (``[m, m]``, created at the first call) and the
          order generator is extra state, so both are saved in checkpoints.

    Args:
        beta: EMA rate of the targets (paper: 1e-2; LibMTL's default is 0.5).
        reduction: ``"sum"`` (default, the paper) or ``"mean"``.
        seed: seed of the generator of the random orders (``None``: from torch's global generator).
        eps: added to denominators, on the Gramian normalised to mean diagonal 1.
    """

    # buffers, registered in __init__ (declared here for the type checker)
    phi_hat: Tensor

    def __init__(self, beta: float = 1e-2, reduction: str = "sum", seed: int | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac beta must be in [0, 1], got {beta}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"GradVac reduction must be 'sum' or 'mean', got {reduction!r}")
        self.beta = float(beta)
        self.reduction = reduction
        self.eps = float(eps)
        self._init_generator(seed)
        self.register_buffer("phi_hat", torch.zeros(0, 0, dtype=torch.float64))

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        g_n, _ = normalized_gramian(gramian)
        if self.phi_hat.shape != (m, m):
            self.phi_hat = torch.zeros(m, m, dtype=torch.float64, device=g_n.device)
        phi_hat = self.phi_hat.to(device=g_n.device, dtype=torch.float64)
        coef, phi_hat = gradvac_coefficients(g_n, self.sample_orders(m), phi_hat, self.beta, self.eps)
        self.phi_hat.copy_(phi_hat)
        weights = coef.sum(0)
        if self.reduction == "mean":
            weights = weights / m
        return as_weights(weights, gramian)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        resize_lazy_buffers(self, state_dict, prefix, ["phi_hat"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"beta": self.beta, "reduction": self.reduction, "seed": self.seed}
