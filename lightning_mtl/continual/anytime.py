"""Anytime evaluation of an online continual-learning run: periodic accuracy on the classes seen so far,
per-class accuracies at the task ends, and the A_auc / A_avg / A_last / F_last summary."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_mtl._modes import eval_mode
from lightning_mtl._plotting import figure_class, figure_to_rgb
from lightning_mtl.continual.base import mask_unseen
from lightning_mtl.continual.metrics import (
    accuracy_matrix,
    anytime_auc,
    average_accuracy,
    class_accuracy,
    forgetting_last,
    last_accuracy,
)

__all__ = ["AnytimeEvaluation", "evaluation_plan"]


def evaluation_plan(schedule: Sequence[Any], eval_period: int) -> dict[int, tuple[int, bool]]:
    """The training steps after which :class:`AnytimeEvaluation` evaluates.

    A step is evaluated when it is the last repetition (``last_rep``) of its stream batch and the stream
    crossed a multiple of ``eval_period`` samples since the previous stream batch, or when it ends a task
    (``task_end``).

    Args:
        schedule: one step per training batch, each with ``samples_seen``, ``last_rep`` and ``task_end``
            attributes (:class:`~lightning_mtl.continual.stream.StreamStep`).
        eval_period: stream samples between periodic evaluations.

    In offline mode (several epochs per task, ``last_rep`` only in the last epoch) the multiples a task's
    samples cross are all counted at the first step of its last epoch: one evaluation weighing that many.

    Returns:
        ``{step index: (multiples crossed, task end)}``; the first value is the weight of the evaluation in
        A_auc (0 for a task end that crossed no multiple, usually 1, more when a stream batch is larger than
        the period).
    """
    plan: dict[int, tuple[int, bool]] = {}
    previous = 0
    for index, step in enumerate(schedule):
        crossed = 0
        if step.last_rep:
            samples = int(step.samples_seen)
            crossed = max(0, samples // eval_period - previous // eval_period)
            previous = max(previous, samples)
        if crossed or step.task_end:
            plan[index] = (crossed, bool(step.task_end))
    return plan


def _class_tasks(schedule: Sequence[Any], num_classes: int) -> list[int]:
    # labels are in exposure order: class k is first exposed by the first step with num_seen > k
    tasks = [-1] * num_classes
    exposed = 0
    for step in schedule:
        for label in range(exposed, min(int(step.num_seen), num_classes)):
            tasks[label] = int(step.task)
        exposed = max(exposed, int(step.num_seen))
    return tasks


class AnytimeEvaluation(pl.Callback):
    """Anytime inference protocol of online continual learning (Koh et al., "Online Continual Learning on
    Class Incremental Blurry Task Configuration with Anytime Inference", ICLR 2022) with the metrics of
    Si-Blurry (Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task Boundary via Mask
    and Visual Prompt Tuning", ICCV 2023).

    Needs a data module with ``schedule`` (one :class:`~lightning_mtl.continual.stream.StreamStep` per
    training batch of the run's single epoch), ``test_dataset(num_seen)`` (the ``(x, label)`` test samples of
    the first ``num_seen`` exposed classes) and ``num_classes``, such as
    :class:`~lightning_mtl.continual.stream.SiBlurryStream`.

    After the training step of the last repetition of a stream batch whose samples crossed a multiple of
    ``eval_period`` (:func:`evaluation_plan`), and after every task's last step, the module is evaluated
    on ``test_dataset(num_seen)``: ``pl_module(x)`` in eval mode without gradients, under the precision
    plugin's forward context, the logits of the classes not exposed yet (``>= num_seen``) set to the
    dtype's minimum. The accuracy (over test samples) is logged as ``anytime/acc`` with
    ``anytime/samples_seen`` at every evaluation (to every logger directly, so none is lost to
    ``log_every_n_steps``; through ``pl_module.log`` for the progress bar and ``callback_metrics``). At
    the task ends the per-class accuracies are kept too (NaN for the classes not seen yet).

    At the end of training the summary ``continual/A_auc``, ``continual/A_avg``, ``continual/A_last`` and
    ``continual/F_last`` (fractions; see :mod:`lightning_mtl.continual.metrics`) goes to every logger and to
    ``trainer.callback_metrics``, and is printed on rank zero. A_auc is the mean of the periodic
    evaluations (task-end evaluations that cross no multiple are left out of it, as in the official code;
    NaN when the stream is shorter than ``eval_period``). With matplotlib installed, the accuracy-over-time
    curve and the task-level accuracy matrix (:func:`~lightning_mtl.continual.metrics.accuracy_matrix`)
    are sent to a ``WandbLogger`` (``log_image``) or else saved as ``anytime_accuracy.png`` and
    ``accuracy_matrix.png`` in the first logger's ``log_dir`` (or ``trainer.default_root_dir``).

    The histories are part of the callback's checkpoint state, so a run resumed mid-stream reports the same
    metrics. Under DDP every rank evaluates its share (``rank::world_size``) of the test samples and the
    per-class correct / total counts are summed over the ranks.

    Differences from the official Si-Blurry code: an evaluation runs after the stream batch that crosses a
    multiple of ``eval_period`` (the official loop evaluates one batch earlier, when the next batch would
    cross it); rank counts are summed, not rank accuracies averaged; a class without test sample has
    accuracy NaN, not 0; F_last keeps classes never classified right before the last task end (see
    :func:`~lightning_mtl.continual.metrics.forgetting_last`).

    Args:
        eval_period: stream samples between periodic evaluations (1,000 in Si-Blurry).
        eval_batch_size: evaluation batch size; None: the data module's ``eval_batch_size``, else its
            ``batch_size``, else 256.
        num_workers: evaluation DataLoader workers; None: the data module's ``num_workers`` (else 0).
        log_images: draw the curve and the matrix (needs matplotlib; skipped with a warning without it).
        verbose: print the summary on rank zero.
    """

    def __init__(
        self,
        eval_period: int = 1000,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        log_images: bool = True,
        verbose: bool = True,
    ) -> None:
        if eval_period < 1:
            raise ValueError(f"eval_period must be positive, got {eval_period}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be positive, got {eval_batch_size}")
        self.eval_period = int(eval_period)
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.log_images = bool(log_images)
        self.verbose = bool(verbose)
        self.num_classes = 0
        self.class_tasks: list[int] = []
        self._plan: dict[int, tuple[int, bool]] = {}
        self._reset()

    def _reset(self) -> None:
        # one dict per evaluation: step, samples_seen, num_seen, task, accuracy, weight (A_auc), task_end
        self.evaluations: list[dict[str, Any]] = []
        # per-class accuracies at the task ends ([num_classes] each, NaN = not seen) and test counts
        self.class_accuracies: list[list[float]] = []
        self.class_counts: list[int] = []
        self.summary: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(eval_period=self.eval_period)

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(trainer, "datamodule", None)
        schedule = getattr(datamodule, "schedule", None)
        if schedule is None or not callable(getattr(datamodule, "test_dataset", None)):
            raise ValueError(
                "AnytimeEvaluation needs a data module with a `schedule` (one StreamStep per training batch: "
                "samples_seen, num_seen, task, last_rep, task_end) and a `test_dataset(num_seen)` method, such as "
                f"lightning_mtl.continual.stream.SiBlurryStream; got {type(datamodule).__name__}"
                + (" (pass it as trainer.fit(model, datamodule=...))" if datamodule is None else "")
            )
        num_classes = getattr(datamodule, "num_classes", None) or getattr(pl_module, "num_classes", None)
        if not num_classes:
            raise ValueError("AnytimeEvaluation needs `num_classes` on the data module or the LightningModule")
        self.num_classes = int(num_classes)
        self._plan = evaluation_plan(schedule, self.eval_period)
        self.class_tasks = _class_tasks(schedule, self.num_classes)
        # a fresh fit starts empty; a resumed one gets its histories back from load_state_dict (called after setup)
        self._reset()

    # -- evaluation ---------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entry = self._plan.get(batch_idx)
        if entry is None:
            return
        schedule = trainer.datamodule.schedule  # type: ignore[attr-defined]  # set by Lightning's data connector
        if batch_idx >= len(schedule):
            raise IndexError(f"training batch {batch_idx} is past the data module's schedule ({len(schedule)} steps)")
        step = schedule[batch_idx]
        weight, task_end = entry
        num_seen = int(step.num_seen)
        correct, total = self._evaluate(trainer, pl_module, num_seen)
        seen_total = int(total.sum())
        accuracy = float(correct.sum()) / seen_total if seen_total else math.nan
        self.evaluations.append(
            {
                "step": int(batch_idx),
                "samples_seen": int(step.samples_seen),
                "num_seen": num_seen,
                "task": int(step.task),
                "accuracy": accuracy,
                "weight": int(weight),
                "task_end": bool(task_end),
            }
        )
        if task_end:
            self.class_accuracies.append(class_accuracy(correct, total, num_seen).tolist())
            self.class_counts = [int(c) for c in total.tolist()]
        metrics = {"anytime/acc": accuracy, "anytime/samples_seen": float(step.samples_seen)}
        # every rank holds the same summed value: no sync needed. The loggers get it directly (below), as
        # Lightning sends step metrics to them only every log_every_n_steps
        for key, value in metrics.items():
            pl_module.log(
                key, value, on_step=True, on_epoch=False, logger=False, prog_bar=key == "anytime/acc", batch_size=1
            )
        self._log_to_loggers(trainer, metrics)

    def _loader(self, trainer: pl.Trainer, num_seen: int) -> DataLoader:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        dataset = datamodule.test_dataset(num_seen)
        if trainer.world_size > 1:
            dataset = Subset(dataset, range(trainer.global_rank, len(dataset), trainer.world_size))
        batch_size = (
            self.eval_batch_size
            or getattr(datamodule, "eval_batch_size", None)
            or getattr(datamodule, "batch_size", None)
            or 256
        )
        workers = self.num_workers if self.num_workers is not None else int(getattr(datamodule, "num_workers", 0) or 0)
        return DataLoader(
            dataset,
            batch_size=int(batch_size),
            shuffle=False,
            num_workers=workers,
            pin_memory=bool(getattr(datamodule, "pin_memory", False)),
        )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, num_seen: int) -> tuple[Tensor, Tensor]:
        """Per-class ``(correct, total)`` on the test samples of the first ``num_seen`` classes, summed over ranks."""
        device = pl_module.device
        counts = torch.zeros(2, self.num_classes, dtype=torch.long, device=device)
        # a frozen backbone held in eval mode during training stays there afterwards
        with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in self._loader(trainer, num_seen):
                x, y = batch[0], batch[1]
                x = x.to(device, non_blocking=True)
                y = torch.as_tensor(y).to(device=device, dtype=torch.long)
                # classes not exposed yet can not be predicted (the Si-Blurry evaluation mask)
                logits = mask_unseen(pl_module(x), num_seen)
                hit = logits.argmax(dim=-1) == y
                counts[0] += torch.bincount(y[hit], minlength=self.num_classes)[: self.num_classes]
                counts[1] += torch.bincount(y, minlength=self.num_classes)[: self.num_classes]
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts[0].cpu(), counts[1].cpu()

    @staticmethod
    def _log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        step = _logging_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- summary ------------------------------------------------------------------------------------
    def compute_summary(self) -> dict[str, float]:
        """``{"continual/A_auc": ..., "continual/A_avg": ..., "continual/A_last": ..., "continual/F_last": ...}``
        of the evaluations so far."""
        periodic = [e for e in self.evaluations if e["weight"] > 0]
        # nominal sample counts (multiples of the period): a plain mean unless a batch crossed several
        nominal = [0]
        for e in periodic:
            nominal.append(nominal[-1] + e["weight"] * self.eval_period)
        task_end_acc = [e["accuracy"] for e in self.evaluations if e["task_end"]]
        return {
            "continual/A_auc": anytime_auc([e["accuracy"] for e in periodic], nominal[1:]) if periodic else math.nan,
            "continual/A_avg": average_accuracy(task_end_acc),
            "continual/A_last": last_accuracy(task_end_acc),
            "continual/F_last": forgetting_last(self.class_accuracies) if self.class_accuracies else math.nan,
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.evaluations:
            rank_zero_warn("AnytimeEvaluation: no evaluation ran during training; no continual metrics to report")
            return
        self.summary = self.compute_summary()
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in self.summary.items()})
        self._log_to_loggers(trainer, self.summary)
        for logger in trainer.loggers:
            logger.save()
        if not trainer.is_global_zero:
            return
        if self.verbose:
            text = " | ".join(f"{key.split('/')[-1]} {100 * value:.2f}" for key, value in self.summary.items())
            print(f"Continual metrics (%): {text}")
        if self.log_images:
            self._draw(trainer)

    # -- images -------------------------------------------------------------------------------------
    def task_accuracy_matrix(self) -> Tensor:
        """``[task ends, tasks]`` accuracy at each task end on the classes first exposed in each task."""
        num_tasks = max(self.class_tasks, default=-1) + 1
        counts = self.class_counts or None
        return accuracy_matrix(self.class_accuracies, self.class_tasks, num_tasks, counts)

    def _draw(self, trainer: pl.Trainer) -> None:
        Figure = figure_class()
        if Figure is None:
            rank_zero_warn(
                "AnytimeEvaluation: matplotlib is not installed; the accuracy curve and matrix are not drawn"
            )
            return
        figures = {"anytime_accuracy": self._curve(Figure)}
        if self.class_accuracies:
            figures["accuracy_matrix"] = self._heatmap(Figure)
        from lightning.pytorch.loggers import WandbLogger

        wandb = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb:
            step = _logging_step(trainer)
            for logger in wandb:
                for name, figure in figures.items():
                    logger.log_image(key=f"continual/{name}", images=[figure_to_rgb(figure)], step=step)
            return
        folder = _image_folder(trainer)
        os.makedirs(folder, exist_ok=True)
        for name, figure in figures.items():
            figure.savefig(os.path.join(folder, f"{name}.png"), dpi=120)

    def _curve(self, figure_class: Any) -> Any:
        figure = figure_class(figsize=(6, 3.6), layout="constrained")
        axes = figure.add_subplot()
        samples = [e["samples_seen"] for e in self.evaluations]
        accs = [100 * e["accuracy"] for e in self.evaluations]
        axes.plot(samples, accs, marker="o", markersize=3)
        for e in self.evaluations:
            if e["task_end"]:
                axes.axvline(e["samples_seen"], color="grey", linestyle="--", linewidth=0.8)
        summary = self.summary or self.compute_summary()
        axes.set_title(f"Anytime accuracy (A_auc {100 * summary['continual/A_auc']:.2f}%)")
        axes.set_xlabel("stream samples seen")
        axes.set_ylabel("accuracy on seen classes (%)")
        axes.grid(alpha=0.3)
        return figure

    def _heatmap(self, figure_class: Any) -> Any:
        matrix, tasks = self._matrix_by_task()
        rows, cols = matrix.shape
        figure = figure_class(figsize=(1.2 + 0.7 * cols, 1.0 + 0.6 * rows), layout="constrained")
        axes = figure.add_subplot()
        image = axes.imshow((100 * matrix).numpy(), vmin=0, vmax=100, cmap="viridis")
        for i in range(rows):
            for j in range(cols):
                value = float(matrix[i, j])
                if not math.isnan(value):
                    axes.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                              color="white" if value < 0.6 else "black")  # fmt: skip
        for i in range(rows):
            if bool(matrix[i].isnan().all()):  # no evaluation after this task: hatched, so it reads as a gap
                axes.axhspan(i - 0.5, i + 0.5, fill=False, hatch="//", edgecolor="grey", linewidth=0)
        axes.set_xticks(range(cols), [str(t + 1) for t in range(cols)])
        axes.set_yticks(range(rows), [str(t + 1) for t in tasks])
        axes.set_xlabel("task of first exposure")
        axes.set_ylabel("after task")
        axes.set_title("Accuracy (%)")
        figure.colorbar(image, ax=axes)
        return figure

    def _matrix_by_task(self) -> tuple[Tensor, list[int]]:
        """The accuracy matrix with one row per task up to the last task end, and the rows' tasks: a task
        that had no task end (the stream left it without samples) is an all-NaN row, not a shifted label."""
        matrix = self.task_accuracy_matrix()
        ends = [int(e["task"]) for e in self.evaluations if e["task_end"]]
        if len(ends) != matrix.shape[0]:  # histories that do not pair up: rows in order
            return matrix, list(range(matrix.shape[0]))
        if sorted(set(ends)) != ends:  # a task that ended twice: each row keeps its task, no gap to draw
            return matrix, ends
        tasks = list(range(ends[-1] + 1)) if ends else []
        full = torch.full((len(tasks), matrix.shape[1]), math.nan, dtype=matrix.dtype)
        full[ends] = matrix
        return full, tasks

    # -- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "evaluations": [dict(e) for e in self.evaluations],
            "class_accuracies": [list(row) for row in self.class_accuracies],
            "class_counts": list(self.class_counts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = [dict(e) for e in state_dict.get("evaluations", [])]
        self.class_accuracies = [list(row) for row in state_dict.get("class_accuracies", [])]
        self.class_counts = list(state_dict.get("class_counts", []))


def _logging_step(trainer: pl.Trainer) -> int:
    # the step Lightning logs its own step metrics at, so W&B sees a non-decreasing step
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(epoch_loop, "_batches_that_stepped", trainer.global_step))


def _image_folder(trainer: pl.Trainer) -> str:
    # trainer.log_dir broadcasts (a collective): this runs on rank zero only, so read the logger directly
    for logger in trainer.loggers:
        folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if folder:
            return str(folder)
    return str(trainer.default_root_dir)
