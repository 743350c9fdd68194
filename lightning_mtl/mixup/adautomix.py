"""AdAutoMix (and AutoMix as a configuration of it): a mask generator on the EMA teacher's features,
trained with (or against) the teacher, and a student trained on the generated mixes."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl._schedules import check_horizon
from lightning_mtl.mixup._base import MixedBatch, mix_targets, sample_beta
from lightning_mtl.mixup.generator import MixMaskGenerator
from lightning_mtl.mixup.losses import soft_target_cross_entropy
from lightning_mtl.mixup.visualize import log_mixed_grid

__all__ = ["AdAutoMix", "AutoMix"]


class AdAutoMix(pl.LightningModule):
    """Adversarial AutoMixup (Qin, Jin, Jiang, El-Yacoubi and Gao, "Adversarial AutoMixup", ICLR 2024).

    **Networks.** A student (``encoder`` + a linear head), its EMA teacher (a copy, updated by the
    :class:`~lightning_mtl.callbacks.ema.EMATeacher` callback, which must be among the Trainer's callbacks;
    the module declares the pairs through :meth:`ema_pairs`), and a :class:`MixMaskGenerator` reading the
    teacher's feature map at ``feature_layer`` (``layer3`` of the CIFAR ResNets: ``[B, 256, 8, 8]``), caught
    by a forward hook while the teacher classifies the clean batch.

    **Each training step** (``K = mix_samples``, 2 or 3):

    1. The teacher (train mode, no gradient) classifies the clean batch; its stage features feed the
       generator. Its BatchNorm statistics are its own (use ``EMATeacher(buffers="own")``, as the paper's
       momentum encoder).
    2. Two independent mixes are drawn, each with ``K`` sources (the sample itself and ``K - 1`` random
       permutations of the batch) and weights ``lambda``: for ``K = 2`` ``lambda ~ Beta(alpha, alpha)``
       (weights ``lambda, 1 - lambda``), for ``K = 3`` three ``Beta(alpha, alpha)`` draws normalized to sum
       1. Labels of the mixes are ``sum_k lambda_k onehot(y_k)``.
    3. **Student**: soft-target cross-entropy on the first mix made with the generator's masks
       **detached**, plus the clean cross-entropy. Lambda margin: if the student's ``lambda_1`` lies
       outside ``[lam_margin, 1 - lam_margin]`` (0.03), its mask falls back to the constant ``lambda``
       (plain mixup). For ``K = 3`` this tests the first weight, as the authors' code does; OpenMixup's
       port of the 3-sample path flips that comparison (it falls back when the weight is *inside* the
       margin); we follow the original. With ``K = 3``, a share ``mixup_ratio`` (0.5) of the clean term is
       replaced by a plain 3-sample linear mixup term on the same sources and weights.
    4. **Generator**, on the second mix (masks with gradient), through the frozen teacher:
       ``L_mix = CE(teacher(x_mix), y_mix)``. Cooperative steps minimize ``L_mix`` (AutoMix). Adversarial
       steps (every other optimizer step, the first one included, as in the authors' code) minimize
       ``-beta * L_mix + (1 - beta) * (1 - S)`` with ``S = sum_k lambda_k cos(teacher(x_mix), teacher(x_k))``:
       the generator makes mixes that are hard for the teacher while their predictions stay close to
       those of their sources, so the mix keeps the meaning of its images. This is the sign of the
       paper's objective, in which the cosine similarity is what prevents "the collapse of the inherent
       meanings of images"; the authors' code adds ``+ (1 - beta) * S`` to the minimized loss, i.e. pushes
       the predictions *apart*. ``cosine_sign="code"`` reproduces the code. ``beta``: 0.3 CIFAR, 0.4
       Tiny-ImageNet, 0.1 ImageNet. The phase follows ``global_step`` parity, so it survives a resume and
       is the same for all micro-batches of an accumulated step.

    Student and generator gradients come from one backward pass of the sum of both losses: the student
    loss does not reach the generator (detached masks) and the generator loss does not reach the
    student (it runs through the teacher, whose parameters never require gradients).

    **AutoMix** (Liu et al., ECCV 2022) is this module with ``adversarial=False`` and ``mix_samples=2``
    (:class:`AutoMix` sets those and AutoMix's CIFAR defaults). It shares the training scheme (generator
    through the momentum teacher, student on the detached mix plus the clean term); AutoMix's mask L1
    loss is not reproduced.

    **Heads.** The authors' code gives the student (and teacher) two linear heads, one for the mixed and
    one for the clean term; here both terms share one head.

    **Optimizers.** ``optimizer`` makes the student's optimizer. With ``generator_optimizer=None`` the
    generator's parameters join that optimizer as a second parameter group (the published recipe: one SGD
    for everything, lr 0.1, cosine to 0); its ``lr_scheduler`` then schedules both groups. With a
    ``generator_optimizer`` the generator gets its own optimizer (and ``generator_lr_scheduler``, stepped
    after every optimizer step), stepped right after the student's; its state is saved in the
    checkpoint. Such a separate optimizer does not run under ``precision="16-mixed"`` (its gradients
    would stay loss-scaled; refused at setup) and is not clipped by ``gradient_clip_val``.

    **Evaluation.** ``evaluate="teacher"`` (default: the published numbers are the EMA teacher's),
    ``"student"``, or ``"both"``; the chosen model's values are ``val/<task>/acc``, ``val/mean/acc`` and
    ``val/loss``; with ``"both"`` also ``val/teacher/<task>/acc`` and ``val/student/<task>/acc``.

    **Logging**: ``train/loss``, ``train/student_loss``, ``train/generator_loss``, ``train/adversarial``;
    every ``log_every_n_steps`` steps a grid of generated mixes with their lambdas (W&B, TensorBoard).

    **Distributed**: the generator and the student are parameters of the DDP-wrapped module, so DDP
    averages both gradients; ranks draw their own lambdas and permutations (of their own batch).

    Args:
        encoder: the student backbone (``out_features`` attribute or ``feature_dim``).
        num_classes: classes of the single task.
        feature_layer: name of the encoder submodule whose output the generator reads.
        feature_channels: channels of that output.
        feature_dim: size of the encoder's output (read from ``encoder.out_features`` if not given).
        mix_samples: 2 or 3 samples per mix.
        alpha: Beta parameter of the lambdas.
        lam_margin: the lambda margin (0 disables the fallback).
        mixup_ratio: share of the clean term replaced by a linear 3-sample mixup term when ``K = 3``.
        beta: weight of the adversarial term (0.3 CIFAR, 0.4 Tiny-ImageNet, 0.1 ImageNet).
        adversarial: alternate cooperative and adversarial generator steps (False: AutoMix).
        cosine_sign: ``"paper"`` (keep the mix's prediction close to its sources') or ``"code"``.
        generator_reduction: see :class:`MixMaskGenerator`.
        lam_concat: see :class:`MixMaskGenerator`.
        upsample_mode: see :class:`MixMaskGenerator`.
        evaluate: ``"teacher"``, ``"student"`` or ``"both"``.
        optimizer: student optimizer factory (and generator's, without ``generator_optimizer``).
        lr_scheduler: scheduler factory for ``optimizer``.
        generator_optimizer: separate optimizer factory for the generator.
        generator_lr_scheduler: scheduler factory for ``generator_optimizer`` (stepped every step).
        task_name: name of the task in dict batches and in the metric keys.
        log_every_n_steps: period of the mixed-sample grid; ``None`` or 0 logs none.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        feature_layer: str = "layer3",
        feature_channels: int = 256,
        feature_dim: int | None = None,
        mix_samples: int = 3,
        alpha: float = 1.0,
        lam_margin: float = 0.03,
        mixup_ratio: float = 0.5,
        beta: float = 0.3,
        adversarial: bool = True,
        cosine_sign: Literal["paper", "code"] = "paper",
        generator_reduction: int = 2,
        lam_concat: bool = False,
        upsample_mode: str = "bilinear",
        evaluate: Literal["teacher", "student", "both"] = "teacher",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        generator_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        task_name: str = "label",
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if mix_samples not in (2, 3):
            raise ValueError(f"mix_samples must be 2 or 3, got {mix_samples}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= lam_margin < 0.5:
            raise ValueError(f"lam_margin must lie in [0, 0.5), got {lam_margin}")
        if not 0.0 <= beta <= 1.0 or not 0.0 <= mixup_ratio <= 1.0:
            raise ValueError(f"beta and mixup_ratio must lie in [0, 1], got {beta}, {mixup_ratio}")
        if cosine_sign not in ("paper", "code"):
            raise ValueError(f"cosine_sign must be 'paper' or 'code', got {cosine_sign!r}")
        if evaluate not in ("teacher", "student", "both"):
            raise ValueError(f"evaluate must be 'teacher', 'student' or 'both', got {evaluate!r}")
        save_init_hyperparameters(self, ["encoder", "optimizer", "lr_scheduler", "generator_optimizer",
                                         "generator_lr_scheduler"], logger=False)  # fmt: skip
        self.encoder = encoder
        dim = feature_dim or getattr(encoder, "out_features", None) or getattr(encoder, "num_features", None)
        if not isinstance(dim, int):
            raise ValueError("cannot tell the encoder's output size: give feature_dim")
        self.head = nn.Linear(dim, num_classes)
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        try:
            layer = self.teacher_encoder.get_submodule(feature_layer)
        except AttributeError:
            names = [n for n, _ in encoder.named_children()]
            raise ValueError(
                f"the encoder has no submodule {feature_layer!r} for the generator; its children are: "
                f"{', '.join(names)}"
            ) from None
        self._features: Tensor | None = None
        layer.register_forward_hook(self._catch_features)
        self.generator = MixMaskGenerator(feature_channels, generator_reduction, lam_concat, True, upsample_mode)
        self.num_classes = int(num_classes)
        self.feature_layer = feature_layer
        self.mix_samples = int(mix_samples)
        self.alpha = float(alpha)
        self.lam_margin = float(lam_margin)
        self.mixup_ratio = float(mixup_ratio)
        self.beta = float(beta)
        self.adversarial = bool(adversarial)
        self.cosine_sign = cosine_sign
        self.evaluate = evaluate
        self.task_name = task_name
        self.log_every_n_steps = log_every_n_steps
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.generator_optimizer_factory = generator_optimizer
        self.generator_lr_scheduler_factory = generator_lr_scheduler
        self._generator_optimizer: torch.optim.Optimizer | None = None
        self._generator_scheduler: Any = None
        self._pending_generator_state: dict[str, Any] | None = None
        self.metrics = nn.ModuleDict(
            {f"{stage}_{who}": MulticlassAccuracy(num_classes, average="micro", ignore_index=-100)
             for stage in ("val", "test") for who in ("teacher", "student")}
        )  # fmt: skip
        # read by BestMetricsSummary: the accuracies are higher-, the loss lower-is-better
        self.metric_directions: dict[str, bool] = {}
        for stage in ("val", "test"):
            self.metric_directions[f"{stage}/loss"] = False
            for name in (task_name, "mean", f"teacher/{task_name}", f"student/{task_name}"):
                self.metric_directions[f"{stage}/{name}/acc"] = True

    # -- the networks ---------------------------------------------------------------------------------
    def _catch_features(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._features = output

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (student, teacher) pairs that :class:`~lightning_mtl.callbacks.ema.EMATeacher` averages."""
        return [(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)]

    def forward(self, inputs: Tensor) -> Tensor:
        """The evaluated model's logits (the teacher unless ``evaluate="student"``)."""
        if self.evaluate == "student":
            return self.head(self.encoder(inputs))
        return self.teacher_head(self.teacher_encoder(inputs))

    def teacher_logits_and_features(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        self._features = None
        logits = self.teacher_head(self.teacher_encoder(inputs))
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError(f"the teacher's {self.feature_layer!r} did not run in its forward pass")
        return logits, features

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is None or stage != "fit":
            return
        from lightning_mtl.callbacks.ema import EMATeacher

        if not any(isinstance(c, EMATeacher) for c in self.trainer.callbacks):  # type: ignore[attr-defined]  # set by Lightning's callback connector
            raise ValueError(
                "AdAutoMix needs the EMATeacher callback (its generator reads the EMA teacher): add "
                "EMATeacher(decay=0.999, schedule='hold_cosine', final_decay=0.999999, buffers='own') to the "
                "Trainer's callbacks"
            )
        precision = str(self.trainer.precision)
        if self.generator_optimizer_factory is not None and precision.startswith("16"):
            raise ValueError(
                f"precision={precision} with a separate generator_optimizer is not supported (its gradients would "
                "stay loss-scaled): use precision='bf16-mixed' or '32-true', or drop generator_optimizer so the "
                "generator joins the main optimizer"
            )

    def configure_optimizers(self) -> Any:
        student = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("generator.")]
        if self.generator_optimizer_factory is None:
            optimizer = self.optimizer_factory([{"params": student}, {"params": list(self.generator.parameters())}])
        else:
            optimizer = self.optimizer_factory(student)
            self._generator_optimizer = self.generator_optimizer_factory(self.generator.parameters())
            if self.generator_lr_scheduler_factory is not None:
                self._generator_scheduler = self.generator_lr_scheduler_factory(self._generator_optimizer)
                check_horizon(
                    self, {"scheduler": self._generator_scheduler, "interval": "step"}, "generator_lr_scheduler"
                )
            if self._pending_generator_state is not None:
                self._load_generator_state(self._pending_generator_state)
                self._pending_generator_state = None
        if self.lr_scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": check_horizon(self, {"scheduler": self.lr_scheduler_factory(optimizer)}),
        }

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._generator_optimizer is not None:
            self._generator_optimizer.step()
            self._generator_optimizer.zero_grad(set_to_none=True)
            if self._generator_scheduler is not None:
                self._generator_scheduler.step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._generator_optimizer is not None:
            checkpoint["generator_optimizer"] = {
                "optimizer": self._generator_optimizer.state_dict(),
                "scheduler": None if self._generator_scheduler is None else self._generator_scheduler.state_dict(),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("generator_optimizer")
        if state is not None:  # the optimizers are made after the checkpoint is read: load them then
            if self._generator_optimizer is None:
                self._pending_generator_state = state
            else:
                self._load_generator_state(state)

    def _load_generator_state(self, state: dict[str, Any]) -> None:
        assert self._generator_optimizer is not None
        self._generator_optimizer.load_state_dict(state["optimizer"])
        if self._generator_scheduler is not None and state.get("scheduler") is not None:
            self._generator_scheduler.load_state_dict(state["scheduler"])

    # -- training -------------------------------------------------------------------------------------
    def _labels(self, targets: Any) -> Tensor:
        if isinstance(targets, Mapping):
            if self.task_name not in targets:
                raise KeyError(f"the batch has no labels for task {self.task_name!r}; it has: {', '.join(targets)}")
            targets = targets[self.task_name]
        if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.ndim != 1:
            raise TypeError("AdAutoMix needs integer class labels [B] (or a dict {task_name: labels})")
        return targets

    def draw_mix(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Sources ``[B, K]`` (the sample itself, then random permutations) and weights ``[K]``."""
        if self.mix_samples == 2:
            lam = sample_beta(self.alpha, device=device)
            weights = torch.cat([lam, 1 - lam])
        else:
            draws = sample_beta(self.alpha, 3, device=device)
            weights = draws / draws.sum()
        index = torch.arange(batch, device=device)
        perms = [torch.randperm(batch, device=device) for _ in range(self.mix_samples - 1)]
        return torch.stack([index, *perms], dim=1), weights

    @staticmethod
    def apply_masks(inputs: Tensor, sources: Tensor, masks: Tensor) -> Tensor:
        """``sum_k masks[:, k] * inputs[sources[:, k]]``."""
        # a sum of tensors is a tensor (typeshed's sum starts from the int 0)
        return cast(
            Tensor, sum(masks[:, k : k + 1].to(inputs.dtype) * inputs[sources[:, k]] for k in range(sources.shape[1]))
        )

    def in_margin(self, weights: Tensor) -> bool:
        first = float(weights[0])
        return self.lam_margin <= first <= 1.0 - self.lam_margin

    def is_adversarial_step(self) -> bool:
        return self.adversarial and self.global_step % 2 == 0

    def training_losses(self, inputs: Tensor, labels: Tensor, adversarial: bool) -> dict[str, Any]:
        """The student's and the generator's losses on one batch (the two never share a gradient path)."""
        batch, size = inputs.shape[0], inputs.shape[-2:]
        with torch.no_grad():
            clean_teacher, features = self.teacher_logits_and_features(inputs)

        # the student's mix: generator masks detached, or plain mixup outside the lambda margin
        src_s, lam_s = self.draw_mix(batch, inputs.device)
        if self.in_margin(lam_s):
            with torch.no_grad():
                masks_s = self.generator([features[src_s[:, k]] for k in range(self.mix_samples)], lam_s, size)
        else:
            masks_s = lam_s.view(1, -1, 1, 1).expand(batch, -1, *size)
        mixed_s = MixedBatch(self.apply_masks(inputs, src_s, masks_s.detach()), src_s, lam_s.expand(batch, -1))
        target_s = mix_targets(labels, mixed_s, self.num_classes)
        mix_loss = soft_target_cross_entropy(self.head(self.encoder(mixed_s.inputs)), target_s)
        clean_loss = F.cross_entropy(self.head(self.encoder(inputs)).float(), labels)
        if self.mix_samples == 3 and self.mixup_ratio > 0:
            linear = MixedBatch(self.apply_masks(inputs, src_s, lam_s.view(1, -1, 1, 1).expand(batch, -1, *size)),
                                src_s, lam_s.expand(batch, -1))  # fmt: skip
            linear_loss = soft_target_cross_entropy(self.head(self.encoder(linear.inputs)), target_s)
            clean_loss = (1 - self.mixup_ratio) * clean_loss + self.mixup_ratio * linear_loss
        student_loss = mix_loss + clean_loss

        # the generator's mix, through the frozen teacher
        src_g, lam_g = self.draw_mix(batch, inputs.device)
        masks_g = self.generator([features[src_g[:, k]] for k in range(self.mix_samples)], lam_g, size)
        mixed_g = MixedBatch(self.apply_masks(inputs, src_g, masks_g), src_g, lam_g.expand(batch, -1))
        mixed_teacher = self.teacher_head(self.teacher_encoder(mixed_g.inputs))
        generator_mix_loss = soft_target_cross_entropy(mixed_teacher, mix_targets(labels, mixed_g, self.num_classes))
        terms = [
            lam_g[k] * F.cosine_similarity(mixed_teacher.float(), clean_teacher[src_g[:, k]].float(), dim=-1)
            for k in range(self.mix_samples)
        ]
        similarity = cast(Tensor, sum(terms)).mean()  # typeshed's sum starts from the int 0
        if adversarial:
            cosine_term = (1 - similarity) if self.cosine_sign == "paper" else similarity
            generator_loss = -self.beta * generator_mix_loss + (1 - self.beta) * cosine_term
        else:
            generator_loss = generator_mix_loss
        return {
            "student": student_loss, "generator": generator_loss, "masks": masks_g, "mixed": mixed_g,
            "student_masks": masks_s, "student_mixed": mixed_s,
            "similarity": similarity.detach(), "generator_mix_loss": generator_mix_loss.detach(),
        }  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = batch[0], self._labels(batch[1])
        adversarial = self.is_adversarial_step()
        out = self.training_losses(inputs, labels, adversarial)
        loss = out["student"] + out["generator"]
        self.log_dict(
            {"train/loss": loss.detach(), "train/student_loss": out["student"].detach(),
             "train/generator_loss": out["generator"].detach(), "train/similarity": out["similarity"],
             "train/adversarial": float(adversarial)},
            on_step=True, on_epoch=False, batch_size=inputs.shape[0],
        )  # fmt: skip
        every = self.log_every_n_steps
        if every and self.global_step % every == 0 and batch_idx % self.trainer.accumulate_grad_batches == 0:
            log_mixed_grid(self.trainer, "train/generated_mix", out["mixed"].inputs, out["mixed"].weights)
        return loss

    # -- evaluation -----------------------------------------------------------------------------------
    def _eval_step(self, batch: Any, stage: str) -> None:
        inputs, labels = batch[0], self._labels(batch[1])
        who = ("teacher", "student") if self.evaluate == "both" else (self.evaluate,)
        for name in who:
            if name == "teacher":
                logits = self.teacher_head(self.teacher_encoder(inputs))
            else:
                logits = self.head(self.encoder(inputs))
            self._metric(stage, name).update(logits.detach(), labels)
            if name == who[0]:
                loss = F.cross_entropy(logits.float(), labels)
                self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=inputs.shape[0], sync_dist=True)

    def _metric(self, stage: str, who: str) -> MulticlassAccuracy:
        return cast(MulticlassAccuracy, self.metrics[f"{stage}_{who}"])  # a ModuleDict's items are typed Module

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def _epoch_end(self, stage: str) -> None:
        who = ("teacher", "student") if self.evaluate == "both" else (self.evaluate,)
        logged = {}
        for name in who:
            metric = self._metric(stage, name)
            if not metric.update_called:
                continue
            value = metric.compute()
            metric.reset()
            if name == who[0]:
                logged[f"{stage}/{self.task_name}/acc"] = value
                logged[f"{stage}/mean/acc"] = value
            if self.evaluate == "both":
                logged[f"{stage}/{name}/{self.task_name}/acc"] = value
        if logged:
            self.log_dict(logged)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")


class AutoMix(AdAutoMix):
    """AutoMix (Liu, Li, Wu, Liu, Chen and Li, "AutoMix: Unveiling the Power of Mixup for Stronger
    Classifiers", ECCV 2022) as a configuration of :class:`AdAutoMix`: the generator cooperates with the
    EMA teacher (no adversarial steps) and mixes 2 samples. Defaults of AutoMix's CIFAR setting in
    OpenMixup: ``alpha = 2``, lambda margin 0.08, nearest upsampling, no lambda channel. AutoMix's mask
    L1 loss (weight 0.1) is not reproduced. See :class:`AdAutoMix` for the arguments.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        feature_layer: str = "layer3",
        feature_channels: int = 256,
        feature_dim: int | None = None,
        mix_samples: int = 2,
        alpha: float = 2.0,
        lam_margin: float = 0.08,
        generator_reduction: int = 2,
        lam_concat: bool = False,
        upsample_mode: str = "nearest",
        evaluate: Literal["teacher", "student", "both"] = "teacher",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        generator_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        task_name: str = "label",
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(
            encoder, num_classes, feature_layer=feature_layer, feature_channels=feature_channels,
            feature_dim=feature_dim, mix_samples=mix_samples, alpha=alpha, lam_margin=lam_margin, mixup_ratio=0.0,
            beta=0.0, adversarial=False, generator_reduction=generator_reduction, lam_concat=lam_concat,
            upsample_mode=upsample_mode, evaluate=evaluate, optimizer=optimizer, lr_scheduler=lr_scheduler,
            generator_optimizer=generator_optimizer, generator_lr_scheduler=generator_lr_scheduler,
            task_name=task_name, log_every_n_steps=log_every_n_steps,
        )  # fmt: skip
