"""Dynamic weight average: task weights from the rate at which each epoch-mean loss falls."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["DynamicWeightAverage"]


@register_aggregator("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic weight average (DWA).

    Liu, S., Johns, E. and Davison, A. J. "End-to-End Multi-Task Learning with Attention." CVPR 2019.

    ``w_i = m softmax(r_i / T)`` with ``r_i = L_i(t-1) / L_i(t-2)``, the ratio of the task's mean
    training loss over the last two epochs; ``w = 1`` during the first two epochs. The epoch means
    are averaged over DDP ranks, so every rank uses the same weights. All state (running sums and
    the last two epoch means) lives in buffers, so checkpoints resume it exactly.

    Args:
        temperature: ``T`` (2 in the paper).
    """

    # buffers, registered in __init__ (declared here for the type checker)
    loss_sum: Tensor
    history: Tensor
    count: Tensor
    epochs_seen: Tensor

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        for name in ("loss_sum", "history"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def bind_tasks(self, names: tuple[str, ...]) -> None:
        self.loss_sum = torch.zeros(len(names), dtype=torch.float64)
        self.history = torch.zeros(2, len(names), dtype=torch.float64)  # row 0: epoch t-2, row 1: t-1

    def weights(self, losses: Tensor) -> Tensor:
        m = losses.numel()
        if self.epochs_seen < 2:
            return torch.ones_like(losses)
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        return (m * torch.softmax(ratio / self.temperature, 0)).to(losses.dtype)

    def forward(self, losses: Tensor) -> Tensor:
        self.loss_sum += losses.detach().to(self.loss_sum)
        self.count += 1
        return super().forward(losses)

    def on_train_epoch_end(self, reduce_mean: Callable[[Tensor], Tensor]) -> None:
        if self.count == 0:
            return
        mean = reduce_mean(self.loss_sum / self.count)
        self.history = torch.stack([self.history[1], mean])
        self.epochs_seen += 1
        self.loss_sum.zero_()
        self.count.zero_()

    def hparams_for_repr(self) -> dict[str, object]:
        return {"temperature": self.temperature}
