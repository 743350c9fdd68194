"""Log how much the task gradients conflict: pairwise cosines and per-task norms, as scalars and a heatmap."""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl._modes import restored_buffers
from lightning_mtl._plotting import figure_class, figure_to_rgb
from lightning_mtl.multitask.engine import GradientEngine, flat_jacobian


class GradientConflictMonitor(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, the cosine between every pair of task gradients.

    Works with :class:`~lightning_mtl.multitask.MultiTaskModule` (any aggregator). The gradients are
    those of the step it logs: of the task losses on that step's batch w.r.t. the encoder's parameters
    (``level="parameter"``) or the shared representation (``"representation"``), at the parameters the
    optimizer step started from. They are the Jacobian the module's
    :class:`~lightning_mtl.multitask.engine.GradientEngine` computed in that step's backward
    (``engine.last_jacobian``), asked for at the batch's start: a gradient method at that level has it
    anyway; a loss weighting, or the other level, gets it computed on the measured steps only (m
    backward passes through the step's graph, no extra forward). Under DDP the engine averages the
    per-rank Jacobians, so every rank logs the same numbers.

    Logs ``train/grad_cos/<a>__<b>`` and ``train/grad_norm/<task>`` once per measurement, at
    ``step=trainer.global_step`` (to every logger directly, so ``log_every_n_steps`` neither shifts nor
    repeats them; through ``pl_module.log`` for ``callback_metrics``), and, unless ``log_image`` is off,
    the cosine matrix as a heatmap ``train/grad_cos`` (blue: conflicting, red: aligned; task names, values,
    colour bar on [-1, 1]) as a uint8 picture through W&B's ``log_image`` or TensorBoard's ``add_image``.
    Without matplotlib the plain coloured cells (:func:`heatmap`) are logged, with one warning.

    Args:
        every_n_steps: how often to measure (each costs at most m backward passes, none where the step
            computes that Jacobian anyway).
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
        self._warned = False
        self._measured_at = 0  # the global step of the last measurement (none before the first optimizer step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(getattr(pl_module, "engine", None), GradientEngine) or not hasattr(pl_module, "encoder"):
            raise TypeError(
                "GradientConflictMonitor needs a MultiTaskModule (task_losses, a shared encoder and its gradient engine)"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # this batch's optimizer step makes global_step + 1; with accumulation every micro-batch of that
        # window asks (the parameters do not move in between) and the last one's Jacobian is read
        if (trainer.global_step + 1) % self.every_n_steps == 0:
            pl_module.engine.request_jacobian(self.level)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        engine = pl_module.engine
        engine.request_jacobian(None)  # a skipped step leaves its request unread
        step = trainer.global_step
        # with accumulate_grad_batches > 1 several batches end at one global step: measure the first only
        if step % self.every_n_steps != 0 or step == self._measured_at or outputs is None:
            return
        self._measured_at = step
        if engine.last_jacobian is None:  # a training_step or backward that bypasses the engine
            rank_zero_warn(f"GradientConflictMonitor: the gradient engine computed no Jacobian for step {step}")
            return
        jac = engine.last_jacobian.float()
        norms = jac.norm(dim=1)
        cosines = (jac @ jac.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
        self.last_cosines = cosines.detach().cpu()
        names = pl_module.task_names
        logged = {f"train/grad_norm/{n}": norms[i] for i, n in enumerate(names)}
        for i, j in itertools.combinations(range(len(names)), 2):
            logged[f"train/grad_cos/{names[i]}__{names[j]}"] = cosines[i, j]
        # Lightning hands step metrics to the loggers only every log_every_n_steps, at another step, and
        # again later with the value unchanged: the loggers get each measurement here, once, at its step
        pl_module.log_dict(logged, on_step=True, on_epoch=False, logger=False)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({key: float(value) for key, value in logged.items()}, step=step)
        if self.log_image:
            _log_image(trainer, "train/grad_cos", self._picture(names, step), step)

    def _picture(self, names: list[str], step: int) -> Any:
        cosines = self.last_cosines
        assert cosines is not None  # drawn right after a measurement
        image = conflict_image(cosines, names, step)
        if image is None:
            if not self._warned:
                rank_zero_warn(
                    "GradientConflictMonitor: matplotlib is not installed; the heatmap is drawn without task names or values"
                )
                self._warned = True
            image = (heatmap(cosines) * 255).round().byte().permute(1, 2, 0).numpy()
        return image

    def jacobian(self, pl_module: Any, batch: Any) -> Tensor:
        """Task-gradient matrix ``[m, n]`` on ``batch`` at the current weights, in one extra forward whose
        buffer updates (BatchNorm statistics) are undone: for use outside training (the monitor itself
        reads the engine's Jacobian of the step it logs)."""
        with restored_buffers(pl_module), torch.enable_grad():
            inputs, targets = pl_module.unpack_batch(batch)
            features = pl_module.encoder(inputs)
            preds = {name: head(features) for name, head in pl_module.heads.items()}
            terms, _ = pl_module.task_loss_terms(preds, targets, "train")
            if self.level == "parameter":
                wrt = [p for p in pl_module.encoder.parameters() if p.requires_grad]
            else:
                wrt = [features]
            return flat_jacobian(terms, wrt, batched=features.is_cuda).float().detach()


def heatmap(matrix: Tensor, cell: int = 24) -> Tensor:
    """A ``[3, H, W]`` float image in [0, 1] of a matrix in [-1, 1]: blue (-1), white (0), red (+1)."""
    m = matrix.clamp(-1, 1).float()
    pos, neg = m.clamp_min(0), (-m).clamp_min(0)
    red = 1 - neg
    green = 1 - pos - neg
    blue = 1 - pos
    image = torch.stack([red, green, blue]).clamp(0, 1)
    return image.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def conflict_figure(matrix: Tensor, names: list[str], step: int) -> Any:
    """The cosine matrix as a matplotlib figure: task names on both axes, the values in the cells, a colour
    bar fixed to [-1, 1] (blue: conflicting, red: aligned) and the step in the title; None without matplotlib."""
    Figure = figure_class()
    if Figure is None:
        return None
    values = matrix.detach().double().cpu()
    m = len(names)
    figure = Figure(figsize=(2.2 + 0.8 * m, 1.6 + 0.7 * m), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    for i in range(m):
        for j in range(m):
            value = float(values[i, j])
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if abs(value) > 0.6 else "black")  # fmt: skip
    axes.set_xticks(range(m), names, rotation=45, ha="right")
    axes.set_yticks(range(m), names)
    axes.set_title(f"Task gradient cosine, step {step}")
    figure.colorbar(image, ax=axes)
    return figure


def conflict_image(matrix: Tensor, names: list[str], step: int) -> Any:
    """:func:`conflict_figure` as an ``[H, W, 3]`` uint8 array; None without matplotlib."""
    figure = conflict_figure(matrix, names, step)
    return None if figure is None else figure_to_rgb(figure)


def _log_image(trainer: pl.Trainer, key: str, image: Any, step: int) -> None:
    # uint8 [H, W, 3]: W&B casts float pixels to uint8 as they are (a [0, 1] picture turns black)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
