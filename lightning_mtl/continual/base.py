"""What every continual-learning module shares: the seen-class mask, the step, evaluation and the optimizer.

A continual module reads :class:`~lightning_mtl.continual.stream.StreamBatch` batches from
:class:`~lightning_mtl.continual.stream.SiBlurryStream`: labels come in exposure order (class ``k`` is
the ``k``-th class to appear), so "the classes seen so far" is always the prefix ``0 .. num_seen - 1``
and masking unseen classes is one comparison with an ``arange``, no index lists and no device sync.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._schedules import check_horizon

__all__ = ["ContinualModule", "mask_unseen"]


def mask_unseen(logits: Tensor, num_seen: Tensor | int) -> Tensor:
    """``logits`` with the columns of classes not seen yet (``>= num_seen``) set to the dtype's minimum.

    ``num_seen`` is an int, a scalar tensor, or a ``[B]`` tensor (one count per row). The minimum, not
    ``-inf``, keeps a softmax finite in 16-bit precision and keeps ``0 * logit`` products defined.
    """
    classes = torch.arange(logits.shape[-1], device=logits.device)
    if isinstance(num_seen, Tensor):
        num_seen = num_seen.to(logits.device)
        seen = classes < (num_seen.reshape(-1, 1) if num_seen.dim() else num_seen)
    else:
        seen = classes < int(num_seen)
    return logits.masked_fill(~seen, torch.finfo(logits.dtype).min)


class ContinualModule(pl.LightningModule):
    """Base of the class-incremental modules (ER, linear baseline, L2P, DualPrompt, MVP, OnePrompt).

    A subclass creates ``self.head`` (features to ``num_classes`` logits) and implements
    :meth:`features`; it may override :meth:`training_loss` to add its own terms. The base masks the
    classes not exposed yet in training (each step's ``num_seen``) and evaluation (the most classes
    exposed in training so far, the buffer :attr:`seen_classes`, saved with the weights), logs
    ``train/loss`` / ``train/acc`` and ``val|test/acc``, stops on a non-finite loss naming the step,
    and hands :meth:`trainable_parameters` to the optimizer.

    Args:
        num_classes: classes of the whole stream (the data module's ``num_classes``).
        optimizer: optimizer factory (default Adam, lr 5e-3: the Si-Blurry setting of every method).
        lr_scheduler: optional scheduler factory (the Si-Blurry recipes use a constant rate).
    """

    head: nn.Module

    seen_classes: Tensor  # a buffer, registered in __init__ (declared here for the type checker)

    def __init__(
        self,
        num_classes: int,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.register_buffer("seen_classes", torch.zeros((), dtype=torch.long))
        # read by BestMetricsSummary: accuracy higher, loss lower is better
        self.metric_directions: dict[str, bool] = {
            f"{stage}/{key}": key == "acc" for stage in ("val", "test") for key in ("acc", "loss")
        }

    # -- what a method provides -------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """The ``[B, D]`` representation the head reads."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of every class, unmasked."""
        return self.head(self.features(x))

    def training_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one step and the extra scalars to log as ``train/<name>``.

        Default: cross-entropy of the logits masked to the classes seen at this step. The dict may hold
        ``"logits"`` (the masked logits) for the training accuracy.
        """
        logits = mask_unseen(self(batch.x), batch.num_seen)
        return F.cross_entropy(logits, batch.y), {"logits": logits}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (those that require gradients)."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- Lightning --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # a head narrower than the stream would fail later with an opaque out-of-bounds target error
        datamodule = self._trainer.datamodule if self._trainer is not None else None  # type: ignore[attr-defined]  # set by Lightning's data connector
        stream_classes = getattr(datamodule, "num_classes", None)
        if isinstance(stream_classes, int) and stream_classes > self.num_classes:
            raise ValueError(
                f"{type(self).__name__} has num_classes={self.num_classes} but the data stream has {stream_classes} "
                f"classes: set model.init_args.num_classes to {stream_classes}"
            )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # the most classes exposed so far: evaluation masks the rest (a max, so replayed rows that
        # carry an older count change nothing)
        self.seen_classes = torch.maximum(self.seen_classes, batch.num_seen.max().to(self.seen_classes))
        loss, extras = self.training_loss(batch)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite training loss {loss.item():g} at global step "
                f"{self.global_step} (batch {batch_idx}); lower the learning rate or check the inputs"
            )
        logged = {
            f"train/{name}": value.detach() for name, value in extras.items() if name != "logits" and value.dim() == 0
        }
        logged["train/loss"] = loss.detach()
        logits = extras.get("logits")
        if logits is not None:
            logged["train/acc"] = (logits.detach().argmax(dim=1) == batch.y).float().mean()
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=len(batch.y))
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        seen = max(int(self.seen_classes), 1)
        logits = mask_unseen(self(x), seen)
        self.log_dict(
            {f"{stage}/acc": (logits.argmax(dim=1) == y).float().mean(), f"{stage}/loss": F.cross_entropy(logits, y)},
            on_step=False,
            on_epoch=True,
            batch_size=len(y),
            sync_dist=True,
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameter")
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=5e-3)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        config = {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": check_horizon(self, config)}

    @staticmethod
    def mask_unseen(logits: Tensor, num_seen: Tensor | int) -> Tensor:
        """See :func:`mask_unseen`."""
        return mask_unseen(logits, num_seen)
