"""MultiTaskModule: a shared encoder, named task heads, and a pluggable way of combining task losses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mtl.aggregators import Aggregator, LinearScalarization, LossWeighting, create_aggregator
from lightning_mtl.multitask.delta_m import delta_m
from lightning_mtl.multitask.tasks import ClassificationTask, Task, TaskError

_STAGES = ("val", "test")


class MultiTaskModule(pl.LightningModule):
    """Multi-task learning with a shared encoder and one head per named task.

    Each training step computes the per-task losses (``[m]``, in the order of ``tasks``) and hands
    them to the ``aggregator``, the single place where loss weighting and gradient aggregation plug
    in. With the default, linear scalarization, the objective is ``sum_t weight_t * loss_t``.

    Logged keys: ``train/<task>/loss`` and ``train/loss`` every step; ``val/<task>/loss``,
    ``val/<task>/<metric>``, ``val/mean/<metric>`` (mean over the tasks that have that metric),
    ``val/loss`` (sum of the task losses) and, with ``baselines``, ``val/delta_m`` (Delta m %, lower
    is better); the same under ``test/``.

    Args:
        encoder: the shared encoder, any ``nn.Module`` mapping inputs to ``[batch, features]``.
        tasks: task name -> :class:`~lightning_mtl.multitask.tasks.Task`; names must match the keys of
            the labels the data module yields.
        aggregator: how task losses are combined: a registered name (``"ls"``) or an
            :class:`~lightning_mtl.aggregators.Aggregator`. Linear scalarization uses each task's
            ``weight`` unless it is given weights of its own.
        optimizer: optimizer factory (dependency injection from the CLI), called with the parameters.
        lr_scheduler: optional LR scheduler factory, called with the optimizer; ``ReduceLROnPlateau``
            watches ``val/loss``.
        baselines: single-task results ``{task: {metric: value}}`` for Delta m %.
        feature_dim: size of the encoder output; read from ``encoder.out_features`` (or timm's
            ``num_features``) when not given.
        on_nonfinite_loss: ``"raise"`` stops with an error naming the task and step; ``"skip"``
            warns and skips that optimizer step (on every DDP rank alike).
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: dict[str, Task],
        aggregator: Aggregator | str = "ls",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        baselines: dict[str, dict[str, float]] | None = None,
        feature_dim: int | None = None,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskModule needs at least one task in `tasks`")
        for name, task in tasks.items():
            if not isinstance(task, Task):
                raise TypeError(f"task {name!r} must be a Task (e.g. ClassificationTask), got {type(task).__name__}")
            if not name.isidentifier():
                raise ValueError(f"task name {name!r} must be a Python identifier (letters, digits, underscores)")
        if on_nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite_loss must be 'raise' or 'skip', got {on_nonfinite_loss!r}")
        self.save_hyperparameters(ignore=["encoder", "tasks", "aggregator", "optimizer", "lr_scheduler"], logger=False)

        self.encoder = encoder
        self.tasks = dict(tasks)
        self.task_names = tuple(tasks)
        self.feature_dim = feature_dim or _infer_feature_dim(encoder)
        self.heads = nn.ModuleDict({name: task.build_head(self.feature_dim) for name, task in tasks.items()})
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict({name: nn.ModuleDict(task.build_metrics()) for name, task in tasks.items()})
                for stage in _STAGES
            }
        )
        self.aggregator = self._build_aggregator(aggregator)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.baselines = baselines or {}
        self._check_baselines()
        self.on_nonfinite_loss = on_nonfinite_loss
        self.metric_directions: dict[str, bool] = {"val/loss": False, "val/delta_m": False}
        self._labels_checked: set[str] = set()
        self._finite_host: Tensor | None = None
        self._pending_check: tuple[Any, Tensor, tuple[int, int, int]] | None = None

    # -- construction helpers -------------------------------------------------------------------
    def _build_aggregator(self, aggregator: Aggregator | str) -> Aggregator:
        if isinstance(aggregator, str):
            aggregator = create_aggregator(aggregator)
        if isinstance(aggregator, LinearScalarization) and aggregator.fixed is None:
            aggregator.fixed = [task.weight for task in self.tasks.values()]
        if not isinstance(aggregator, LossWeighting):
            raise ValueError(
                f"aggregator {type(aggregator).__name__} combines task gradients, which MultiTaskModule "
                "cannot compute yet; use a loss weighting such as 'ls'"
            )
        return aggregator

    def _check_baselines(self) -> None:
        for task, values in self.baselines.items():
            if task not in self.tasks:
                raise ValueError(f"baselines name unknown task {task!r}; tasks are: {', '.join(self.task_names)}")
            known = self.metrics["val"][task]
            for metric in values:
                if metric not in known:
                    raise ValueError(
                        f"baselines[{task!r}] names metric {metric!r}, which task {task!r} does not compute; "
                        f"its metrics are: {', '.join(known)}"
                    )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        provided = getattr(datamodule, "task_names", None)
        if provided is not None:
            unknown = [name for name in self.task_names if name not in provided]
            if unknown:
                raise ValueError(
                    f"unknown task name(s) {unknown} in model tasks: {type(datamodule).__name__} provides "
                    f"labels for {', '.join(provided)}"
                )

    # -- forward --------------------------------------------------------------------------------
    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        features = self.encoder(inputs)
        return {name: head(features) for name, head in self.heads.items()}

    def unpack_batch(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Split a batch ``(inputs, {task: labels})`` (a bare label tensor is fine for one task)."""
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError("a MultiTaskModule batch must be a pair (inputs, {task: labels})")
        inputs, targets = batch[0], batch[1]
        if isinstance(targets, Tensor):
            if len(self.task_names) != 1:
                raise TypeError(
                    f"labels came as one tensor but the model has {len(self.task_names)} tasks; "
                    "the data module must yield a dict {task: labels}"
                )
            targets = {self.task_names[0]: targets}
        if not isinstance(targets, Mapping):
            raise TypeError(f"labels must be a dict {{task: labels}}, got {type(targets).__name__}")
        return inputs, dict(targets)

    def task_losses(
        self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor], stage: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The vector ``[m]`` of task losses, in the order of ``tasks``, and the checked targets."""
        losses, checked = [], {}
        for name, task in self.tasks.items():
            if name not in targets:
                raise KeyError(
                    f"the batch has no labels for task {name!r}; it has labels for: {', '.join(targets) or 'nothing'}"
                )
            target = checked[name] = task.check(name, preds[name], targets[name])
            if stage not in self._labels_checked and isinstance(task, ClassificationTask):
                task.check_values(name, target)  # a device sync: first batch of each stage only
            losses.append(task.loss(preds[name], target))
        self._labels_checked.add(stage)
        return torch.stack(losses), checked

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        inputs, targets = self.unpack_batch(batch)
        losses, _ = self.task_losses(self(inputs), targets, "train")
        if not self._losses_finite(losses, batch_idx):
            return None
        loss = self.aggregator(losses)
        batch_size = inputs.shape[0]
        detached = losses.detach()
        logged = {f"train/{name}/loss": detached[i] for i, name in enumerate(self.task_names)}
        logged["train/loss"] = loss.detach()
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _losses_finite(self, losses: Tensor, batch_idx: int) -> bool:
        """Whether to take this step. On one GPU with ``on_nonfinite_loss="raise"`` the check is deferred
        to :meth:`on_train_batch_end` (a non-blocking copy and an event), so that it costs no device sync
        in the middle of the step; elsewhere it decides at once (under DDP, alike on every rank)."""
        detached = losses.detach()
        where = (self.global_step, self.current_epoch, batch_idx)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if detached.is_cuda and self.on_nonfinite_loss == "raise" and not distributed:
            if self._finite_host is None:
                self._finite_host = torch.ones((), dtype=torch.bool, pin_memory=True)
            self._finite_host.copy_(torch.isfinite(detached).all(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_check = (event, detached, where)
            return True
        all_finite = bool(torch.isfinite(detached).all())
        if distributed:
            all_finite = self.trainer.strategy.reduce_boolean_decision(all_finite, all=True)
        if not all_finite:
            self._nonfinite(detached, where)
        return all_finite

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._pending_check is not None:
            event, detached, where = self._pending_check
            self._pending_check = None
            event.synchronize()
            if not bool(self._finite_host):
                self._nonfinite(detached, where)

    def _nonfinite(self, losses: Tensor, where: tuple[int, int, int]) -> None:
        """Raise (or, with ``on_nonfinite_loss="skip"``, warn) naming the tasks and the step."""
        values = losses.tolist()
        bad = [f"{name}={value:g}" for name, value in zip(self.task_names, values) if not math.isfinite(value)]
        step, epoch, batch_idx = where
        message = (
            f"non-finite loss for task {', '.join(bad) or '(on another rank)'} at global step {step} "
            f"(epoch {epoch}, batch {batch_idx})"
        )
        if self.on_nonfinite_loss == "skip":
            rank_zero_warn(f"{message}; skipping this optimizer step (on_nonfinite_loss='skip')")
            return
        raise FloatingPointError(
            f"{message}. Check that task's labels and the learning rate, or set "
            "model.init_args.on_nonfinite_loss=skip to skip such steps"
        )

    def _eval_step(self, batch: Any, stage: str) -> None:
        inputs, targets = self.unpack_batch(batch)
        preds = self(inputs)
        losses, checked = self.task_losses(preds, targets, stage)
        for name, task in self.tasks.items():
            task.update_metrics(dict(self.metrics[stage][name].items()), preds[name], checked[name])
        logged = {f"{stage}/{name}/loss": value for name, value in zip(self.task_names, losses)}
        logged[f"{stage}/loss"] = losses.sum()
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=inputs.shape[0], sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def _log_epoch_metrics(self, stage: str) -> None:
        values: dict[str, dict[str, float]] = {}
        higher: dict[str, dict[str, bool]] = {}
        by_metric: dict[str, list[Tensor]] = {}
        logged: dict[str, Tensor] = {}
        for name in self.task_names:
            values[name], higher[name] = {}, {}
            for metric_name, metric in self.metrics[stage][name].items():
                if not metric.update_called:
                    continue
                value = metric.compute()  # torchmetrics syncs across DDP ranks here
                metric.reset()
                logged[f"{stage}/{name}/{metric_name}"] = value
                by_metric.setdefault(metric_name, []).append(value.float())
                values[name][metric_name] = float(value)
                higher[name][metric_name] = bool(metric.higher_is_better)
                self.metric_directions[f"{stage}/{name}/{metric_name}"] = bool(metric.higher_is_better)
                self.metric_directions[f"{stage}/mean/{metric_name}"] = bool(metric.higher_is_better)
        for metric_name, items in by_metric.items():
            logged[f"{stage}/mean/{metric_name}"] = torch.stack(items).mean()
        if self.baselines and all(m in values[t] for t, ms in self.baselines.items() for m in ms):
            logged[f"{stage}/delta_m"] = torch.tensor(delta_m(values, self.baselines, higher))
            self.metric_directions[f"{stage}/delta_m"] = False
        if logged:
            self.log_dict(logged, on_step=False, on_epoch=True)

    # -- optimization ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}


def _infer_feature_dim(encoder: nn.Module) -> int:
    for attr in ("out_features", "num_features", "embed_dim"):
        value = getattr(encoder, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"cannot tell the output size of encoder {type(encoder).__name__}: give model.init_args.feature_dim, "
        "or give the encoder an `out_features` attribute"
    )


__all__ = ["MultiTaskModule", "TaskError"]
