"""Log how much the task gradients conflict: pairwise cosines and per-task norms, as scalars and a heatmap."""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from lightning_mtl.multitask.engine import flat_jacobian


class GradientConflictMonitor(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, the cosine between every pair of task gradients.

    Works with :class:`~lightning_mtl.multitask.MultiTaskModule` (any aggregator). The gradients are
    those of the task losses on the step's batch w.r.t. the encoder's parameters (``level=
    "parameter"``) or the shared representation (``"representation"``), taken right after the
    optimizer step, in one extra forward whose BatchNorm statistics updates are undone. Under DDP
    the per-rank Jacobians are averaged first, so every rank logs the same numbers.

    Logs ``train/grad_cos/<a>__<b>`` and ``train/grad_norm/<task>``, and, unless ``log_image`` is
    off, the cosine matrix as a heatmap image ``train/grad_cos`` (blue: conflicting, red: aligned)
    through W&B's ``log_image`` or TensorBoard's ``add_image``.

    Args:
        every_n_steps: how often to measure (each costs one forward and m backward passes).
        level: ``"parameter"`` or ``"representation"``.
        log_image: also log the heatmap.
    """

    def __init__(self, every_n_steps: int = 50, level: str = "parameter", log_image: bool = True) -> None:
        if level not in ("parameter", "representation"):
            raise ValueError(f"level must be 'parameter' or 'representation', got {level!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.level, self.log_image = every_n_steps, level, log_image
        self.last_cosines: Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "task_losses") or not hasattr(pl_module, "encoder"):
            raise TypeError("GradientConflictMonitor needs a MultiTaskModule (task_losses and a shared encoder)")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps != 0 or outputs is None:
            return
        jac = self.jacobian(pl_module, batch)
        if trainer.world_size > 1:
            jac = trainer.strategy.reduce(jac, reduce_op="mean")
        norms = jac.norm(dim=1)
        cosines = (jac @ jac.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
        self.last_cosines = cosines.detach().cpu()
        names = pl_module.task_names
        logged = {f"train/grad_norm/{n}": norms[i] for i, n in enumerate(names)}
        for i, j in itertools.combinations(range(len(names)), 2):
            logged[f"train/grad_cos/{names[i]}__{names[j]}"] = cosines[i, j]
        pl_module.log_dict(logged, on_step=True, on_epoch=False)
        if self.log_image and trainer.is_global_zero:
            _log_image(trainer, "train/grad_cos", heatmap(self.last_cosines))

    def jacobian(self, pl_module: Any, batch: Any) -> Tensor:
        """Task-gradient matrix ``[m, n]`` on ``batch`` at the current weights (buffers restored)."""
        buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
        try:
            with torch.enable_grad():
                inputs, targets = pl_module.unpack_batch(batch)
                features = pl_module.encoder(inputs)
                preds = {name: head(features) for name, head in pl_module.heads.items()}
                terms, _ = pl_module.task_loss_terms(preds, targets, "train")
                if self.level == "parameter":
                    wrt = [p for p in pl_module.encoder.parameters() if p.requires_grad]
                else:
                    wrt = [features]
                return flat_jacobian(terms, wrt, batched=features.is_cuda).float().detach()
        finally:
            with torch.no_grad():  # the extra forward must not move BatchNorm statistics
                for name, b in pl_module.named_buffers():
                    b.copy_(buffers[name])


def heatmap(matrix: Tensor, cell: int = 24) -> Tensor:
    """A ``[3, H, W]`` float image in [0, 1] of a matrix in [-1, 1]: blue (-1), white (0), red (+1)."""
    m = matrix.clamp(-1, 1).float()
    pos, neg = m.clamp_min(0), (-m).clamp_min(0)
    red = 1 - neg
    green = 1 - pos - neg
    blue = 1 - pos
    image = torch.stack([red, green, blue]).clamp(0, 1)
    return image.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def _log_image(trainer: pl.Trainer, key: str, image: Tensor) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=trainer.global_step)
