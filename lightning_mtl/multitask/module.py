"""MultiTaskModule: a shared encoder, named task heads, and a pluggable way of combining task losses."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl._schedules import check_horizon
from lightning_mtl.aggregators import (
    Aggregator,
    AggregatorName,
    GramianWeighting,
    LinearScalarization,
    LossWeighting,
    create_aggregator,
)
from lightning_mtl.multitask.auto_mode import choose_gradient_mode
from lightning_mtl.multitask.delta_m import delta_m
from lightning_mtl.multitask.engine import GradientEngine, TaskStep
from lightning_mtl.multitask.fmtl import FMTL
from lightning_mtl.multitask.gramian import record_layers
from lightning_mtl.multitask.tasks import Task, TaskError

_STAGES = ("val", "test")


class _PendingCheck(NamedTuple):
    """A deferred non-finite loss check, read at the batch's end (one GPU, ``on_nonfinite_loss="raise"``)."""

    event: Any  # the CUDA event after the copy of the flag to the host
    losses: Tensor
    where: tuple[int, int, int]  # (global step, epoch, batch index)
    inputs: Any
    targets: dict[str, Tensor]


class MultiTaskModule(pl.LightningModule):
    """Multi-task learning with a shared encoder and one head per named task.

    Each training step computes the per-task losses (``[m]``, in the order of ``tasks``) and hands
    them to the ``aggregator``, the single place where loss weighting and gradient aggregation plug
    in. With the default, linear scalarization, the objective is ``sum_t weight_t * loss_t``. This
    class is the Lightning glue: the gradient path (per-task Jacobians, aggregation, F-MTL, the loss
    scale, the DDP means) belongs to its :class:`~lightning_mtl.multitask.engine.GradientEngine`,
    ``self.engine``, which also keeps the last task weights, Gramian and Jacobian for logging.

    Logged keys: ``train/<task>/loss`` and ``train/loss`` every step; ``val/<task>/loss``,
    ``val/<task>/<metric>``, ``val/mean/<metric>`` (mean over the tasks that have that metric),
    ``val/loss`` (sum of the task losses) and, with ``baselines``, ``val/delta_m`` (Delta m %, lower
    is better); the same under ``test/``.

    Args:
        encoder: the shared encoder, any ``nn.Module`` mapping inputs to ``[batch, features]``, or a
            multi-task architecture of :mod:`lightning_mtl.architectures` (its task-specific parts then
            wrap each task's head; gradient methods aggregate over the encoder's shared parameters).
        tasks: task name -> :class:`~lightning_mtl.multitask.tasks.Task`; names must match the keys of
            the labels the data module yields.
        aggregator: how task losses are combined: a registered name (``"ls"``; in configs also as a
            ``class_path`` with ``init_args``) or an :class:`~lightning_mtl.aggregators.Aggregator`.
            Linear scalarization uses each task's ``weight`` unless it is given weights of its own.
        optimizer: optimizer factory (dependency injection from the CLI), called with the parameters.
        lr_scheduler: optional LR scheduler factory, called with the optimizer; ``ReduceLROnPlateau``
            watches ``val/loss``.
        baselines: single-task results ``{task: {metric: value}}`` for Delta m %.
        feature_dim: size of the encoder output; read from ``encoder.out_features`` (or timm's
            ``num_features``) when not given.
        on_nonfinite_loss: ``"raise"`` stops with an error naming the task, the step and whether the
            inputs, the labels or the model went non-finite first; ``"skip"`` warns and skips that
            optimizer step (on every DDP rank alike).
        gradient_mode: for gradient aggregators: ``"parameter"`` aggregates the Jacobian of the task
            losses w.r.t. the encoder's parameters; ``"representation"`` (MGDA-UB style, Gramian
            weightings only) computes the weights from the gradients w.r.t. the shared
            representation and back-propagates the weighted loss once; ``"gramian"`` (Gramian
            weightings only) gives the parameter level's update from the m x m Gramian alone,
            accumulated layer by layer from the encoder's ``nn.Linear`` / ``nn.Conv2d`` inputs and
            per-task output gradients (other parameters take their per-task gradients directly),
            never the m x n Jacobian: less memory, and less work where the layers' rows are few
            (see ``docs/multitask.md``). Under DDP each layer's cross-rank terms are gathered or
            averaged over the ranks (:mod:`lightning_mtl.multitask.gramian`). No F-MTL, no
            in-place operation on a recorded layer's output. ``"auto"`` picks ``"gramian"`` or
            ``"parameter"`` at the first training step of each fit, by the measured rule of
            :func:`~lightning_mtl.multitask.auto_mode.choose_gradient_mode` (m, the encoder's layers,
            the batch size, the device); ``engine.mode`` tells which.
        jacobian_batched: one batched backward for the Jacobian (``True``) or a loop of m backward
            passes (``False``); ``None`` batches on GPUs and loops on CPUs, where batching buys nothing.
        jacobian_chunk_size: at most this many Jacobian rows per batched backward (memory bound).
        fmtl: an :class:`~lightning_mtl.multitask.fmtl.FMTL` to seek task-based flat regions (F-MTL) with
            the aggregator, whatever its kind (parameter level only).

    Gradient aggregators under the Trainer's flags: precision ``32-true``, ``bf16-mixed`` and
    ``16-mixed`` (the aggregator sees unscaled gradients; the direction is scaled back, so
    GradScaler's unscale and its skip of non-finite steps apply as usual); ``gradient_clip_val``
    clips the aggregated gradient; ``strategy="ddp"`` averages the Jacobian (parameter level) or
    sums the m x m Gramian (representation level) over ranks, or gathers / averages the per-layer
    pieces of the Gramian (Gramian level, cross-rank terms included), which equals the
    single-process update on the concatenated batch.
    ``accumulate_grad_batches > 1`` is refused at setup.

    Checkpoints of CLI runs rebuild the model alone (``MultiTaskModule.load_from_checkpoint(path)``,
    ``test --ckpt_path path``): they hold the class paths and init args of the encoder and tasks. Built
    in Python, pass the objects again: ``load_from_checkpoint(path, encoder=..., tasks=...)``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: dict[str, Task],
        aggregator: Aggregator | AggregatorName = "ls",  # type: ignore[assignment]  # jsonargparse checks a given name as AggregatorName; the default is a known one
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        baselines: dict[str, dict[str, float]] | None = None,
        feature_dim: int | None = None,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
        gradient_mode: Literal["parameter", "representation", "gramian", "auto"] = "parameter",
        jacobian_batched: bool | None = None,
        jacobian_chunk_size: int | None = None,
        fmtl: FMTL | None = None,
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
        if gradient_mode not in ("parameter", "representation", "gramian", "auto"):
            raise ValueError(
                f"gradient_mode must be 'parameter', 'representation', 'gramian' or 'auto', got {gradient_mode!r}"
            )
        injected = ["encoder", "tasks", "aggregator", "optimizer", "lr_scheduler", "fmtl"]
        save_init_hyperparameters(self, injected, logger=False)
        if callable(getattr(encoder, "attach", None)):
            # a multi-task architecture (MTAN, MMoE, PLE, cross-stitch, ...; lightning_mtl.architectures):
            # the encoder holds the shared parameters, its task-specific parts wrap each task's head
            if gradient_mode == "representation" and not getattr(encoder, "returns_tensor", True):
                raise ValueError(
                    f"gradient_mode='representation' needs one shared representation; {type(encoder).__name__} "
                    "has task-specific representations: use gradient_mode='parameter'"
                )
            # duck typed (attach checked above); nn.Module types its attributes as Tensor | Module
            architecture = cast(Any, encoder)
            tasks = architecture.attach(dict(tasks))
            feature_dim = feature_dim or architecture.out_features

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
        # read by BestMetricsSummary (losses and Delta m lower is better); the metrics add theirs when logged
        lower = ("loss", "delta_m", *(f"{name}/loss" for name in self.task_names))
        self.metric_directions: dict[str, bool] = {f"{stage}/{key}": False for stage in _STAGES for key in lower}
        self.gradient_mode = gradient_mode
        self.jacobian_batched = jacobian_batched
        self.jacobian_chunk_size = jacobian_chunk_size
        if self.aggregator.kind != "loss" and gradient_mode in ("representation", "gramian"):
            if not isinstance(self.aggregator, GramianWeighting):
                raise ValueError(
                    f"gradient_mode={gradient_mode!r} needs a Gramian weighting; {type(self.aggregator).__name__} "
                    "works on the full Jacobian: use gradient_mode='parameter'"
                )
        if fmtl is not None and gradient_mode not in ("parameter", "auto"):
            raise ValueError(
                f"fmtl perturbs the shared parameters task by task, so it needs gradient_mode='parameter' "
                f"(got gradient_mode={gradient_mode!r})"
            )
        self.fmtl = fmtl
        if fmtl is not None and fmtl.variant == "flat" and not isinstance(self.aggregator, LossWeighting):
            self.flat_aggregator = copy.deepcopy(self.aggregator)  # its own state, saved in checkpoints
        # a plain object, not a submodule: the aggregators stay where checkpoints have them
        self.engine = GradientEngine(
            self.aggregator, mode="parameter" if gradient_mode == "auto" else gradient_mode, batched=jacobian_batched, chunk_size=jacobian_chunk_size, fmtl=fmtl,
            flat_aggregator=getattr(self, "flat_aggregator", None), encoder=self.encoder,
            heads=[self.heads[name] for name in self.task_names],
        )  # fmt: skip
        self._mode_chosen = False  # gradient_mode="auto": set at the first training step
        self._finite_host: Tensor | None = None
        self._pending_check: _PendingCheck | None = None
        # label range checks of this batch, read at its end: (event, [k, 3] stats, tasks, (step, epoch), stage)
        self._pending_labels: list[tuple[Any, Tensor, tuple[str, ...], tuple[int, int], str]] = []

    # -- construction helpers -------------------------------------------------------------------
    def _build_aggregator(self, aggregator: Aggregator | str) -> Aggregator:
        if isinstance(aggregator, str):
            aggregator = create_aggregator(aggregator)
        if isinstance(aggregator, LinearScalarization) and aggregator.fixed is None:
            aggregator.set_weights([task.weight for task in self.tasks.values()])
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator or a registered name, got {type(aggregator).__name__}")
        aggregator.bind_tasks(self.task_names)
        return aggregator

    @property
    def uses_gradients(self) -> bool:
        """Whether backward() works on per-task gradients: a gradient aggregator, or F-MTL."""
        return self.engine.uses_gradients

    def _check_baselines(self) -> None:
        for task, values in self.baselines.items():
            if task not in self.tasks:
                raise ValueError(f"baselines name unknown task {task!r}; tasks are: {', '.join(self.task_names)}")
            known = self.metrics["val"][task]  # type: ignore[index]  # nested ModuleDict items are typed Module
            for metric in values:
                if metric not in known:
                    raise ValueError(
                        f"baselines[{task!r}] names metric {metric!r}, which task {task!r} does not compute; "
                        f"its metrics are: {', '.join(known)}"
                    )

    def _choose_mode(self, rows: int) -> None:
        """``gradient_mode="auto"``: set the engine's level by the rule of
        :func:`~lightning_mtl.multitask.auto_mode.choose_gradient_mode`, once per fit (the first
        batch's size and the device it trains on; a smaller last batch does not switch it)."""
        gramian_ok = isinstance(self.aggregator, GramianWeighting) and self.fmtl is None
        self.engine.mode = choose_gradient_mode(self.encoder, len(self.task_names), gramian_ok, self.device, rows)
        self._mode_chosen = True

    def on_fit_start(self) -> None:
        self._mode_chosen = False  # each fit chooses on its own device and batch

    def setup(self, stage: str) -> None:
        if self._trainer is not None and stage == "fit" and self.uses_gradients:
            self._check_trainer_for_gradient_methods()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        provided = getattr(datamodule, "task_names", None)
        if provided is not None:
            unknown = [name for name in self.task_names if name not in provided]
            if unknown:
                raise ValueError(
                    f"unknown task name(s) {unknown} in model tasks: {type(datamodule).__name__} provides "
                    f"labels for {', '.join(provided)}"
                )
            self._check_data_classes(datamodule)

    def _check_data_classes(self, datamodule: Any) -> None:
        """Compare the data's classes with each class-index task's ``num_classes`` once, before any step."""
        try:
            data_classes = datamodule.num_classes
        except (AttributeError, NotImplementedError):
            return
        if not isinstance(data_classes, Mapping):
            return
        task_types = getattr(datamodule, "task_types", None) or {}
        for name, task in self.tasks.items():
            classes, found = getattr(task, "num_classes", None), data_classes.get(name)
            if not isinstance(classes, int) or not isinstance(found, int):
                continue
            if task_types.get(name, "classification") == "classification" and found > classes:
                raise ValueError(
                    f"task {name!r}: {type(datamodule).__name__} has labels up to {found - 1} "
                    f"(classes 0..{found - 1}) but the {type(task).__name__} has num_classes={classes}: set "
                    f"model.init_args.tasks.{name}.init_args.num_classes to {found} (or fix the labels)"
                )

    def _check_trainer_for_gradient_methods(self) -> None:
        name = type(self.aggregator).__name__
        if self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"accumulate_grad_batches={self.trainer.accumulate_grad_batches} is not supported with {name}: it "
                "aggregates the task gradients of each batch, so micro-batches would be aggregated one by one. "
                "Use a larger data batch_size instead (or a loss weighting such as 'ls')"
            )
        strategy = type(self.trainer.strategy).__name__
        if self.trainer.world_size > 1 and "DDP" not in strategy:
            raise ValueError(
                f"strategy {strategy} is not supported with {name}: per-task gradients need the full shared "
                "parameters on every rank; use strategy='ddp'"
            )
        if not self.automatic_optimization:
            raise ValueError(f"{name} writes the gradients in backward(); keep automatic_optimization=True")

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
        terms, checked = self.task_loss_terms(preds, targets, stage)
        return torch.stack(terms), checked

    def task_loss_terms(
        self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor], stage: str
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """The m scalar task losses (unstacked: per-task backward passes then skip the other heads)."""
        losses, checked, ranges = [], {}, {}
        for name, task in self.tasks.items():
            if name not in targets:
                raise KeyError(
                    f"the batch has no labels for task {name!r}; it has labels for: {', '.join(targets) or 'nothing'}"
                )
            target = task.check(name, preds[name], targets[name])
            # out-of-range labels leave the loss (no IndexError, no device-side assert) and are reported at
            # the batch's end, so the check of every batch costs no device sync in the middle of the step
            target, stats = task.mask_out_of_range(target)
            if stats is not None:
                ranges[name] = stats
            checked[name] = target
            losses.append(task.loss(preds[name], target))
        if ranges:
            self._defer_label_check(ranges, stage)
        return losses, checked

    def _defer_label_check(self, ranges: dict[str, Tensor], stage: str) -> None:
        stats = torch.stack(list(ranges.values()))
        where = (self.global_step, self.current_epoch)
        if self._trainer is None:  # no batch-end hook will read it: read it now (free on the host)
            self._raise_out_of_range(tuple(ranges), stats, stage, None)
            return
        event = None
        if stats.is_cuda:
            stats = stats.to("cpu", non_blocking=True)  # into pinned memory, without waiting
            event = torch.cuda.Event()
            event.record()
        self._pending_labels.append((event, stats, tuple(ranges), where, stage))

    def _check_pending_labels(self, batch_idx: int) -> None:
        """Read this batch's label range checks (waiting only for the kernels that computed them)."""
        pending, self._pending_labels = self._pending_labels, []
        for event, stats, names, (step, epoch), stage in pending:
            if event is not None:
                event.synchronize()
            self._raise_out_of_range(names, stats, stage, (step, epoch, batch_idx))

    def _raise_out_of_range(
        self, names: tuple[str, ...], stats: Tensor, stage: str, where: tuple[int, int, int] | None
    ) -> None:
        for name, (count, lowest, highest) in zip(names, stats.tolist()):
            if not count:
                continue
            at = "" if where is None else f" at global step {where[0]} (epoch {where[1]}, {stage} batch {where[2]})"
            labels = "1 label" if count == 1 else f"{count} labels"
            raise TaskError(
                f"task {name!r}: {labels} in {lowest}..{highest} {'is' if count == 1 else 'are'} out of range for "
                f"num_classes={self.tasks[name].num_classes}{at}; fix the labels (missing ones must be negative) or "  # type: ignore[attr-defined]  # only class-index tasks report ranges
                f"set model.init_args.tasks.{name}.init_args.num_classes"
            )

    # -- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        engine = self.engine
        engine.start_step()
        inputs, targets = self.unpack_batch(batch)
        if self.gradient_mode == "auto" and not self._mode_chosen:
            self._choose_mode(len(inputs))
        layers = None
        if engine.mode == "gramian" and engine.uses_gradients:
            # the Gramian level contracts the encoder's layer inputs with their per-task output gradients
            with record_layers(self.encoder) as layers:
                features = self.encoder(inputs)
        else:
            features = self.encoder(inputs)
        preds = {name: head(features) for name, head in self.heads.items()}
        terms, checked = self.task_loss_terms(preds, targets, "train")
        losses = torch.stack(terms)
        if not self._losses_finite(losses, batch_idx, inputs, targets):
            return None
        objective = self._weighted_objective(terms, losses) if isinstance(self.aggregator, LossWeighting) else None
        # on the gradient path the closure's loss is the sum (backward() aggregates the per-task gradients)
        closure_loss = losses.sum() if engine.uses_gradients else objective

        def task_loss(i: int, pred: Tensor) -> Tensor:  # F-MTL's perturbed passes, on this batch's labels
            name = self.task_names[i]
            return self.tasks[name].loss(pred, checked[name])

        # without per-task gradients the aggregator is a loss weighting, so its objective is set
        assert closure_loss is not None
        engine.stage(TaskStep(terms, losses, closure_loss, features, objective, inputs, task_loss, layers))
        engine.record_losses(losses)
        loss = closure_loss if objective is None else objective
        batch_size = inputs.shape[0]
        detached = losses.detach()
        logged = {f"train/{name}/loss": detached[i] for i, name in enumerate(self.task_names)}
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=batch_size, prog_bar=True)
        return closure_loss

    def _weighted_objective(self, terms: list[Tensor], losses: Tensor) -> Tensor:
        """A loss weighting's objective (GradNorm also gets the task gradient norms it needs)."""
        return self.engine.objective(losses, lambda: self.engine.gradient_norms(terms, self.last_shared_parameters()))

    def _losses_finite(self, losses: Tensor, batch_idx: int, inputs: Any, targets: dict[str, Tensor]) -> bool:
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
            self._pending_check = _PendingCheck(event, detached, where, inputs, targets)
            return True
        all_finite = bool(torch.isfinite(detached).all())
        if distributed:
            all_finite = self.trainer.strategy.reduce_boolean_decision(all_finite, all=True)
        if not all_finite:
            self._nonfinite(detached, where, inputs, targets)
        return all_finite

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if not self.engine.staged:
            return super().backward(loss, *args, **kwargs)
        shared = [p for p in self.encoder.parameters() if p.requires_grad]
        others = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
        forward_context = (
            self.trainer.precision_plugin.forward_context if self._trainer is not None else contextlib.nullcontext
        )
        rest = self.engine.backward(loss, shared, others, self._world_size(), forward_context)
        if rest is not None:  # a loss weighting, or the representation level's weighted loss
            super().backward(rest, *args, **kwargs)
        return None

    def last_shared_parameters(self) -> list[Tensor]:
        """Parameters of the encoder's last module that has any (GradNorm's "last shared layer")."""
        leaves = [
            m for m in self.encoder.modules()
            if not any(True for _ in m.children()) and any(p.requires_grad for p in m.parameters(recurse=False))
        ]  # fmt: skip
        if not leaves:
            raise ValueError("the encoder has no trainable parameters for a last-shared-layer method")
        return [p for p in leaves[-1].parameters(recurse=False) if p.requires_grad]

    def _world_size(self) -> int:
        return 1 if self._trainer is None else self.trainer.world_size

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._world_size() > 1 and self.uses_gradients and self.engine.mode in ("parameter", "gramian"):
            # the engine averages the Jacobian itself; DDP's own gradient hooks must stay quiet
            model = self.trainer.strategy.model
            assert model is not None  # the strategy holds the wrapped module while it trains
            model.require_backward_grad_sync = False  # type: ignore[assignment]  # torch types attributes as Tensor | Module

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._check_pending_labels(batch_idx)
        if outputs is not None:  # a step was taken (not skipped for a non-finite loss)
            self.engine.after_step(lambda: self._losses_after(batch), self._reduce_mean)
        if self.engine.last_weights is not None:
            weights = self.engine.last_weights.float()
            self.log_dict({f"train/weight/{name}": weights[i] for i, name in enumerate(self.task_names)},
                          on_step=True, on_epoch=False)  # fmt: skip
        if self._pending_check is not None:
            check, self._pending_check = self._pending_check, None
            check.event.synchronize()
            if not bool(self._finite_host):
                self._nonfinite(check.losses, check.where, check.inputs, check.targets)

    def _losses_after(self, batch: Any) -> Tensor:
        """The same batch's task losses at the updated parameters (FAMO's extra forward)."""
        with torch.no_grad():
            inputs, targets = self.unpack_batch(batch)
            return self.task_losses(self(inputs), targets, "train")[0]

    def _reduce_mean(self, tensor: Tensor) -> Tensor:
        if self._world_size() <= 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="mean")

    def on_train_epoch_end(self) -> None:
        self.engine.on_train_epoch_end(self._reduce_mean)

    def _nonfinite(
        self, losses: Tensor, where: tuple[int, int, int], inputs: Any, targets: Mapping[str, Tensor]
    ) -> None:
        """Raise (or, with ``on_nonfinite_loss="skip"``, warn) naming the tasks, the step and the cause."""
        values = losses.tolist()
        bad = [f"{name}={value:g}" for name, value in zip(self.task_names, values) if not math.isfinite(value)]
        step, epoch, batch_idx = where
        message = (
            f"non-finite loss for task {', '.join(bad) or '(on another rank)'} at global step {step} "
            f"(epoch {epoch}, batch {batch_idx})"
        )
        if bad:
            message = f"{message}: {self._nonfinite_cause(inputs, targets)}"
        if self.on_nonfinite_loss == "skip":
            rank_zero_warn(f"{message}; skipping this optimizer step (on_nonfinite_loss='skip')")
            return
        raise FloatingPointError(f"{message}. Or set model.init_args.on_nonfinite_loss=skip to skip such steps")

    def _nonfinite_cause(self, inputs: Any, targets: Mapping[str, Tensor]) -> str:
        """Whether the inputs, a task's labels or, both finite, the model went non-finite first (the error
        path only: it syncs)."""
        count = _count_nonfinite(inputs)
        if count:
            return f"the batch's inputs hold {_values(count, 'non-finite value')}; clean the data or its transform"
        causes = []
        for name in self.task_names:
            target = targets.get(name)
            if isinstance(target, Tensor) and target.is_floating_point():
                count = int(torch.isinf(target).sum())  # NaN marks a missing label, inf does not
                if count:
                    causes.append(f"the labels of task {name!r} hold {_values(count, 'infinite value')}")
        if causes:
            return "; ".join(causes) + " (missing float labels must be NaN)"
        return (
            "the inputs and labels are finite, so the model's outputs went non-finite: lower the learning rate "
            "or check the heads and the encoder"
        )

    def _eval_step(self, batch: Any, stage: str) -> None:
        inputs, targets = self.unpack_batch(batch)
        preds = self(inputs)
        losses, checked = self.task_losses(preds, targets, stage)
        for name, task in self.tasks.items():
            task.update_metrics(dict(self.metrics[stage][name].items()), preds[name], checked[name])  # type: ignore[index]  # nested ModuleDict items are typed Module
        logged = {f"{stage}/{name}/loss": value for name, value in zip(self.task_names, losses)}
        logged[f"{stage}/loss"] = losses.sum()
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=inputs.shape[0], sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_pending_labels(batch_idx)

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_pending_labels(batch_idx)

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
            for metric_name, metric in self.metrics[stage][name].items():  # type: ignore[index]  # nested ModuleDict items are typed Module
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
        # the progress bar shows each task's validation metrics (the bar has room for a few keys only)
        shown = {k: v for k, v in logged.items() if stage == "val" and k.split("/")[1] in self.task_names}
        if shown:
            self.log_dict(shown, on_step=False, on_epoch=True, prog_bar=True)
        rest = {k: v for k, v in logged.items() if k not in shown}
        if rest:
            self.log_dict(rest, on_step=False, on_epoch=True)

    # -- optimization ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": check_horizon(self, config)}


def _count_nonfinite(value: Any) -> int:
    """Non-finite entries of the float tensors in ``value`` (a tensor, or a dict / list / tuple of them)."""
    if isinstance(value, Tensor):
        return int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
    if isinstance(value, Mapping):
        return sum(_count_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_nonfinite(v) for v in value)
    return 0


def _values(count: int, what: str) -> str:
    return f"1 {what}" if count == 1 else f"{count} {what}s"


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
