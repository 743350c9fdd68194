"""DB-MTL: log-loss gradients, averaged over time, all rescaled to the largest norm."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_mtl.aggregators._state import resize_lazy_buffers
from lightning_mtl.aggregators.base import JacobianAggregator
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["DBMTL"]


@register_aggregator("db_mtl", "dbmtl")
class DBMTL(JacobianAggregator):
    """Dual-balancing multi-task learning (DB-MTL).

    Lin, B., Jiang, W., Ye, F., Zhang, Y., Chen, P., Chen, Y.-C., Liu, S. and Kwok, J. T.
    "Dual-Balancing for Multi-Task Learning." arXiv:2308.12029, 2023.

    Two balancing steps:

    * loss scale: every task loss is replaced by its logarithm, so the gradients the method sees
      are ``grad log l_i = grad l_i / l_i``. **The engine must pass the Jacobian of the log-losses**
      (``log(l_i + 1e-8)`` in LibMTL); this class announces it with ``uses_log_losses = True``.
    * gradient magnitude: an EMA of each task's gradient,
      ``h_i <- beta_t h_i + (1 - beta_t) grad log l_i`` with ``beta_t = beta / t^beta_sigma``
      (``t`` = step, from 1; ``h`` starts at 0), and the update
      ``d = sum_i (max_j |h_j| / |h_i|) h_i``: every task contributes with the norm of the largest.

    The EMA is a ``[m, n]`` buffer (``grad_ema``), created at the first call (an empty placeholder
    before, resized when a checkpoint is loaded), and ``num_steps`` is a buffer too, so both are in
    checkpoints. It is kept in float32 (or the Jacobian's dtype if wider); the direction is returned
    in the Jacobian's dtype. The memory cost is one extra copy of the Jacobian, as in LibMTL.

    Args:
        beta: EMA coefficient (LibMTL ``DB_beta``, default 0.9).
        beta_sigma: decay exponent of ``beta_t`` (LibMTL ``DB_beta_sigma``, default 0.5).
        eps: added to the norms before dividing (as in LibMTL).
    """

    uses_log_losses: ClassVar[bool] = True

    # buffers, registered in __init__ (declared here for the type checker)
    grad_ema: Tensor
    num_steps: Tensor

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        self.register_buffer("grad_ema", torch.zeros(0, 0))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def forward(self, jacobian: Tensor) -> Tensor:
        j = jacobian.detach()
        dtype = torch.promote_types(j.dtype, torch.float32)
        if self.grad_ema.shape != j.shape or self.grad_ema.dtype != dtype:
            self.grad_ema = torch.zeros(j.shape, dtype=dtype, device=j.device)
            self.num_steps = torch.zeros((), dtype=torch.long, device=j.device)
        self.num_steps += 1
        beta_t = self.beta / self.num_steps.to(dtype).pow(self.beta_sigma)
        j = j.to(dtype)
        ema = torch.lerp(j, self.grad_ema.to(j.device), beta_t.to(j.device))  # j + beta_t (ema - j)
        self.grad_ema.copy_(ema)
        norms = torch.linalg.vector_norm(ema, dim=1)
        alpha = norms.max() / (norms + self.eps)
        return (alpha @ ema).to(jacobian.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        resize_lazy_buffers(self, state_dict, prefix, ["grad_ema"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma}
