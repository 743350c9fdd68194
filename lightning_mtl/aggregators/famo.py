"""FAMO: fast adaptive multitask optimization, balancing the rates at which task losses fall."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["FAMO"]


@register_aggregator("famo")
class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (FAMO).

    Liu, B., Feng, Y., Stone, P. and Liu, Q. "FAMO: Fast Adaptive Multitask Optimization."
    NeurIPS 2023.

    Task logits ``w`` give ``z = softmax(w)``. With ``D_i = l_i - l_i^min + eps`` the objective is
    ``sum_i c z_i log D_i`` with ``c = (sum_i z_i / D_i)^-1`` held constant: one backward, O(1) in
    the number of tasks. After the optimizer step the module hands back the losses of the same
    batch at the new parameters (an extra no-grad forward, as in the official trainer), and ``w``
    takes one Adam step (``lr``, ``weight_decay`` = gamma) along ``J_softmax(w)^T delta`` with
    ``delta = log D(before) - log D(after)``, which raises the weight of tasks whose loss fell
    least. ``w`` and its Adam moments are buffers (not trained by the model's optimizer), saved in
    checkpoints; under DDP the losses are averaged over ranks first, so ``w`` stays identical.

    Args:
        lr: learning rate of the logits (0.025 in the paper).
        weight_decay: gamma, the decay of the logits (1e-3 in the paper's main runs).
        min_losses: lower bounds ``l^min`` per task (default 0 for all).
        eps: the ``1e-8`` in ``D``.
    """

    needs_losses_after_step: ClassVar[bool] = True
    # buffers, registered in __init__ (declared here for the type checker)
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    min_losses: Tensor
    adam_step: Tensor

    def __init__(
        self, lr: float = 0.025, weight_decay: float = 1e-3, min_losses: list[float] | None = None, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.min_losses_arg = None if min_losses is None else [float(v) for v in min_losses]
        for name in ("logits", "exp_avg", "exp_avg_sq", "min_losses"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))

    def bind_tasks(self, names: tuple[str, ...]) -> None:
        m = len(names)
        for name in ("logits", "exp_avg", "exp_avg_sq"):
            setattr(self, name, torch.zeros(m))
        if self.min_losses_arg is not None and len(self.min_losses_arg) != m:
            raise ValueError(f"FAMO got {len(self.min_losses_arg)} min_losses for {m} tasks")
        self.min_losses = torch.tensor(self.min_losses_arg) if self.min_losses_arg else torch.zeros(m)

    def _log_gap(self, losses: Tensor) -> Tensor:
        return (losses.float() - self.min_losses + self.eps).log()

    def weights(self, losses: Tensor) -> Tensor:
        z = torch.softmax(self.logits, 0)
        gap = losses.detach().float() - self.min_losses + self.eps
        c = (z / gap).sum()
        return (z / c).to(losses.dtype)

    def forward(self, losses: Tensor) -> Tensor:
        # c z_i log D_i: the weights are constants, the log makes it rate-balancing
        weights = self.last_weights = self.weights(losses)
        return (weights * self._log_gap(losses).to(losses.dtype)).sum()

    @torch.no_grad()
    def after_step(self, losses_before: Tensor | None = None, losses_after: Tensor | None = None) -> None:
        if losses_before is None or losses_after is None:
            return
        delta = self._log_gap(losses_before) - self._log_gap(losses_after)
        z = torch.softmax(self.logits, 0)
        grad = z * (delta - (z * delta).sum())  # J_softmax(w)^T delta
        # Adam with (decoupled-free, L2) weight decay, as torch.optim.Adam(weight_decay=gamma)
        grad = grad + self.weight_decay * self.logits
        self.adam_step += 1
        beta1, beta2 = 0.9, 0.999
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = int(self.adam_step)
        denom = (self.exp_avg_sq / (1 - beta2**step)).sqrt().add_(1e-8)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - beta1**step))

    def hparams_for_repr(self) -> dict[str, object]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}
