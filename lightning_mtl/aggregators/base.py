"""Interfaces shared by every multi-task weighting and gradient-aggregation method.

A method knows nothing of Lightning. It sees the per-task losses, or the m x n Jacobian ``J`` of the
task losses with respect to the shared parameters, or only its m x m Gramian ``G = J J^T``.

* ``LossWeighting``: maps the vector of task losses to the objective that is back-propagated once
  (linear scalarization, uncertainty weighting, DWA, RLW, FAMO, ...). Cheapest: one backward.
* ``GramianWeighting``: maps ``G`` to task weights ``w``; the update direction is ``J^T w``. Most
  gradient methods (MGDA, PCGrad, CAGrad, IMTL-G, Nash-MTL, UPGrad, ...) are of this form, which
  lets the engine work at the parameter level or at the representation level (MGDA-UB style) and,
  under DDP, reduce m x m numbers instead of m x n.
* ``JacobianAggregator``: needs the Jacobian itself (element-wise methods such as GradDrop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn


class Aggregator(nn.Module):
    """Base class of all methods. ``kind`` tells the engine what the method consumes.

    Hooks that :class:`~lightning_mtl.multitask.MultiTaskModule` calls (all optional):

    * :meth:`bind_tasks` once, at construction, with the task names (to size learnable state before
      the optimizer is built);
    * :meth:`after_step` after every optimizer step; with ``needs_losses_after_step`` it gets the
      task losses of the same batch before and after the step (FAMO), reduced over DDP ranks;
    * :meth:`on_train_epoch_end` with a function that averages a tensor over DDP ranks (DWA).

    Capability flags, declared here with their defaults and overridden by the methods that need them,
    tell the gradient engine (:class:`~lightning_mtl.multitask.engine.GradientEngine`) what to feed in.
    """

    kind: ClassVar[str] = ""
    """What the method consumes: ``"loss"``, ``"gramian"`` or ``"jacobian"``."""
    needs_losses_after_step: ClassVar[bool] = False
    """:meth:`after_step` gets the task losses of the same batch before and after the step (FAMO)."""
    needs_grad_norms: ClassVar[bool] = False
    """A loss weighting whose ``forward`` takes ``grad_norms``, the task gradient norms at the last shared
    layer (GradNorm)."""
    uses_log_losses: ClassVar[bool] = False
    """The method aggregates the Jacobian of the log-losses, ``grad l_i / l_i`` (DB-MTL)."""

    def bind_tasks(self, names: tuple[str, ...]) -> None:
        """Called once with the task names, before the optimizer is created."""

    def after_step(self, losses_before: Tensor | None = None, losses_after: Tensor | None = None) -> None:
        """Called after each optimizer step."""

    def on_train_epoch_end(self, reduce_mean: Callable[[Tensor], Tensor]) -> None:
        """Called at the end of every training epoch."""

    def extra_repr(self) -> str:  # short, readable reprs in logs and the CLI
        return ", ".join(f"{k}={v}" for k, v in self.hparams_for_repr().items())

    def hparams_for_repr(self) -> dict[str, object]:
        return {}


class LossWeighting(Aggregator):
    """Maps task losses (shape ``[m]``) to one scalar objective.

    Subclasses implement :meth:`weights`; :meth:`forward` returns ``sum_i w_i * l_i``. Methods with
    learnable parameters (uncertainty weighting) override :meth:`forward` and keep those parameters
    as ``nn.Parameter`` of this module, so the optimizer of the LightningModule trains them.
    """

    kind: ClassVar[str] = "loss"
    last_weights: Tensor | None = None
    """The weights of the last :meth:`forward` (for logging; drawing them again could differ)."""

    def weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, losses: Tensor) -> Tensor:
        weights = self.last_weights = self.weights(losses).detach()
        return (weights * losses).sum()


class GramianWeighting(Aggregator):
    """Maps the Gramian ``G = J J^T`` (shape ``[m, m]``) to task weights ``w`` (shape ``[m]``)."""

    kind: ClassVar[str] = "gramian"

    def forward(self, gramian: Tensor) -> Tensor:
        raise NotImplementedError

    def aggregate(self, jacobian: Tensor) -> Tensor:
        """Direction ``J^T w`` for a Jacobian of shape ``[m, n]``."""
        weights = self(jacobian @ jacobian.T)
        return weights.to(jacobian.dtype) @ jacobian


class JacobianAggregator(Aggregator):
    """Maps the Jacobian (shape ``[m, n]``) to one update direction (shape ``[n]``)."""

    kind: ClassVar[str] = "jacobian"

    def forward(self, jacobian: Tensor) -> Tensor:
        raise NotImplementedError

    def aggregate(self, jacobian: Tensor) -> Tensor:
        return self(jacobian)


def as_float64(t: Tensor) -> Tensor:
    """Small m x m solves run in float64 so that bf16/fp16 training does not upset them."""
    return t.detach().to(torch.float64)
