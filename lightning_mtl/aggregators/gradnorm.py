"""GradNorm: learned task weights that equalize the tasks' gradient norms at the last shared layer."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["GradNorm"]


@register_aggregator("gradnorm")
class GradNorm(LossWeighting):
    """Gradient normalization (GradNorm).

    Chen, Z., Badrinarayanan, V., Lee, C.-Y. and Rabinovich, A. "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks." ICML 2018.

    Learnable weights ``w`` (start at 1). With ``n_i = |grad_W l_i|`` at the last shared layer ``W``
    (the module computes these norms: m backward passes through the heads and that layer only),
    ``G_i = w_i n_i``, the inverse training rates ``r_i = (l_i / l_i(0)) / mean_j (l_j / l_j(0))``
    and the target ``mean(G) r_i^alpha`` held constant, the weights follow the gradient of
    ``L_grad = sum_i |G_i - mean(G) r_i^alpha|`` (the network does not: it follows
    ``sum_i w_i l_i`` with ``w`` held constant). After every optimizer step ``w`` is renormalized to
    sum to ``m``. The weights are parameters of this module, trained by the module's optimizer as in
    the paper; under DDP their gradient is averaged like any other.

    Args:
        alpha: the asymmetry ``alpha`` (1.5 in the paper's NYUv2 runs).
    """

    needs_grad_norms: ClassVar[bool] = True

    # buffers, registered in __init__ (declared here for the type checker)
    initial_losses: Tensor

    def __init__(self, alpha: float = 1.5) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.loss_weights = nn.Parameter(torch.ones(0))
        self.register_buffer("initial_losses", torch.zeros(0))

    def bind_tasks(self, names: tuple[str, ...]) -> None:
        self.loss_weights = nn.Parameter(torch.ones(len(names)))

    def weights(self, losses: Tensor) -> Tensor:
        return self.loss_weights.detach().to(losses.dtype)

    def forward(self, losses: Tensor, grad_norms: Tensor | None = None) -> Tensor:
        if grad_norms is None:
            raise ValueError("GradNorm needs the task gradient norms at the last shared layer (grad_norms)")
        detached = losses.detach().float()
        if self.initial_losses.numel() == 0:
            self.initial_losses = detached.clone()
        weights = self.last_weights = self.weights(losses)
        objective = (weights * losses).sum()
        norms = self.loss_weights * grad_norms.detach().float()
        ratio = detached / self.initial_losses.clamp_min(1e-12)
        target = (norms.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        grad_loss = (norms - target).abs().sum()
        # adds L_grad's gradient for the weights without changing the objective's value
        return objective + (grad_loss - grad_loss.detach()).to(objective.dtype)

    @torch.no_grad()
    def after_step(self, losses_before: Tensor | None = None, losses_after: Tensor | None = None) -> None:
        w = self.loss_weights
        w.mul_(w.numel() / w.sum().clamp_min(1e-12))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + "initial_losses"
        if key in state_dict and state_dict[key].shape != self.initial_losses.shape:
            self.initial_losses = torch.zeros_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hparams_for_repr(self) -> dict[str, object]:
        return {"alpha": self.alpha}
