"""ControllableMultiTaskModule: one slimmable multi-task network trained for every width configuration."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.aggregators import Aggregator, AggregatorName, LossWeighting
from lightning_mtl.controllable.decoder import SlimmableDecoder
from lightning_mtl.controllable.layers import SwitchableBatchNorm2d, set_width, slimmable_modules
from lightning_mtl.controllable.sampler import ENCODER, ConfigurationSampler, WidthConfig
from lightning_mtl.multitask import MultiTaskModule, Task

__all__ = ["ControllableMultiTaskModule"]


class ControllableMultiTaskModule(MultiTaskModule):
    """A multi-task network whose encoder and task decoders are slimmable, trained so that any width
    configuration works at run time (budget and task preference chosen after training).

    Aich, Schulter, Roy-Chowdhury, Chandraker and Suh, "Efficient Controllable Multi-Task Architectures",
    ICCV 2023. Each training step runs the sandwich rule (:class:`ConfigurationSampler`): the widest
    configuration, the narrowest and ``num_random`` random ones. Every configuration adds its task losses,
    weighted by the loss weighting; every configuration but the widest adds the configuration-invariant
    knowledge distillation (CI-KD) term ``kd_weight * mse(f_c, sg(f_wide)[:, :d_c])``: its encoder features
    are pulled towards the first ``d_c`` features of the widest encoder's (a stop-gradient teacher). The
    configurations' losses are summed into one loss, so accumulation, clipping and the precision plugins apply
    as to any loss.

    Loss weightings of the aggregator registry (``ls``, ``uw``, ``dwa``, ``rlw``, ``famo``, ...) compute their
    weights once per step, from the widest configuration's task losses; the other configurations' losses are
    weighted by the same (detached) weights. Gradient aggregators (PCGrad, MGDA, ...) are refused: they would
    need one Jacobian per configuration (the paper's abstract and pipeline figure describe none).

    Validation, test and ``forward`` use :attr:`configuration` (the widest unless :meth:`set_configuration`
    chose another). Under DDP every rank draws the same configurations (the sampler's state is the same on
    every rank), and batch-norm layers of widths a step did not use take part in the loss with weight zero, so
    DDP needs no ``find_unused_parameters``.

    Args:
        encoder: a slimmable encoder (layers of :mod:`lightning_mtl.controllable.layers`) with a ``width_mults``
            attribute, e.g. :class:`~lightning_mtl.controllable.SlimmableDigitsCNN`.
        tasks: task name -> :class:`~lightning_mtl.multitask.Task`; a task without a head gets a
            :class:`~lightning_mtl.controllable.SlimmableDecoder`; a given head must contain slimmable layers.
        aggregator: a loss weighting: a registered name or an instance.
        optimizer: optimizer factory.
        lr_scheduler: optional LR scheduler factory.
        baselines: single-task results for Delta m % (see :class:`MultiTaskModule`).
        feature_dim: encoder features of the widest network; read from ``encoder.out_features`` by default.
        decoder_widths: the decoders' width multipliers (1.0 included).
        decoder_hidden: hidden units of the widest decoder.
        num_random: random configurations per step besides the widest and the narrowest.
        kd_weight: weight of the CI-KD term (0 turns it off).
        seed: seed of the configuration sampler.
        on_nonfinite_loss: see :class:`MultiTaskModule`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tasks: dict[str, Task],
        aggregator: Aggregator | AggregatorName = "ls",  # type: ignore[assignment]  # jsonargparse checks a given name; the default is a known one
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        baselines: dict[str, dict[str, float]] | None = None,
        feature_dim: int | None = None,
        decoder_widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        decoder_hidden: int = 64,
        num_random: int = 2,
        kd_weight: float = 1.0,
        seed: int = 0,
        on_nonfinite_loss: Literal["raise", "skip"] = "raise",
    ) -> None:
        encoder_widths = getattr(encoder, "width_mults", None)
        if not slimmable_modules(encoder) or encoder_widths is None:
            raise ValueError(
                f"{type(encoder).__name__} is not slimmable: give an encoder built from lightning_mtl.controllable "
                "layers with a `width_mults` attribute, e.g. SlimmableDigitsCNN"
            )
        if kd_weight < 0:
            raise ValueError(f"kd_weight must be >= 0, got {kd_weight}")
        features = feature_dim or getattr(encoder, "out_features", None)
        if not isinstance(features, int):
            raise ValueError(f"cannot tell the output size of {type(encoder).__name__}: give feature_dim")
        super().__init__(
            encoder, _slimmable_tasks(tasks, features, decoder_hidden), aggregator, optimizer, lr_scheduler,
            baselines, features, on_nonfinite_loss,
        )  # fmt: skip
        save_init_hyperparameters(self, ["encoder", "tasks", "aggregator", "optimizer", "lr_scheduler"], logger=False)
        if self.aggregator.kind != "loss":
            raise ValueError(
                f"{type(self.aggregator).__name__} aggregates task gradients, which ControllableMultiTaskModule does "
                "not support (one Jacobian per width configuration): use a loss weighting such as 'ls', 'uw' or 'dwa'"
            )
        self.sampler = ConfigurationSampler(self.task_names, encoder_widths, decoder_widths, num_random, seed)
        self.kd_weight = float(kd_weight)
        self.configuration: WidthConfig = self.sampler.widest()
        self.last_configurations: list[WidthConfig] = []

    def set_configuration(self, config: Mapping[str, float]) -> None:
        """Set the widths that ``forward``, validation and test use: ``{"encoder": w, <task>: w, ...}``.

        Raises:
            ValueError: a key is missing or unknown, or a width is not one of the trained widths.
        """
        config = self.sampler.check(config)
        set_width(self.encoder, config[ENCODER])
        for name in self.task_names:
            set_width(self.heads[name], config[name])
        self.configuration = config

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        self.engine.start_step()
        inputs, targets = self.unpack_batch(batch)
        kept = self.configuration
        configs = self.sampler.sandwich()
        self.last_configurations = configs
        total: Tensor | None = None
        teacher: Tensor | None = None
        weights: Tensor | None = None
        all_losses, kd_terms = [], []
        for config in configs:
            self.set_configuration(config)
            features = self.encoder(inputs)
            preds = {name: head(features) for name, head in self.heads.items()}
            terms, _ = self.task_loss_terms(preds, targets, "train")
            losses = torch.stack(terms)
            if teacher is None:  # the widest configuration: the weighting's call and the teacher
                teacher = features.detach()
                objective = self._weighted_objective(terms, losses)
                weights = cast(LossWeighting, self.aggregator).last_weights
                widest = losses
            else:
                assert weights is not None  # every loss weighting records its weights
                objective = (weights.detach().to(losses.dtype) * losses).sum()
                kd = F.mse_loss(features.float(), teacher[:, : features.shape[1]].float())
                kd_terms.append(kd)
                objective = objective + self.kd_weight * kd
            all_losses.append(losses)
            total = objective if total is None else total + objective
        self.set_configuration(kept)
        assert total is not None and teacher is not None
        if not self._losses_finite(torch.stack(all_losses).mean(0), batch_idx, inputs, targets):
            return None
        if self._world_size() > 1:
            total = total + 0.0 * _switchable_norm_anchor(self.encoder)
        self.engine.record_losses(widest)
        batch_size = inputs.shape[0]
        detached = widest.detach()
        logged = {f"train/{name}/loss": detached[i] for i, name in enumerate(self.task_names)}
        if kd_terms:
            logged["train/kd"] = torch.stack(kd_terms).detach().mean()
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", total.detach(), on_step=True, on_epoch=False, batch_size=batch_size, prog_bar=True)
        return total


def _slimmable_tasks(tasks: Mapping[str, Any], features: int, hidden: int) -> dict[str, Any]:
    """Copies of the tasks whose heads are slimmable decoders (a task's own head must be slimmable)."""
    out = {}
    for name, task in tasks.items():
        if isinstance(task, Task):  # anything else, MultiTaskModule rejects with its own message
            task = copy.copy(task)
            if task.head is None:
                task.head = SlimmableDecoder(features, task.out_features, hidden)
            elif not slimmable_modules(task.head):
                raise ValueError(
                    f"task {name!r}: its head must contain slimmable layers (SlimmableLinear, ...) so that it reads "
                    "the encoder's features at any width; leave head unset for a SlimmableDecoder"
                )
        out[name] = task
    return out


def _switchable_norm_anchor(module: nn.Module) -> Tensor:
    """The sum of every switchable batch norm's parameters: added with weight zero, it puts the widths a step
    did not use in the graph, so DDP's reducer sees a gradient for every parameter."""
    params = [p.sum() for m in module.modules() if isinstance(m, SwitchableBatchNorm2d) for p in m.parameters()]
    return torch.stack(params).sum() if params else torch.zeros(())
