"""EMATeacher: exponential moving average of a module's weights, kept as a teacher inside the module."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["EMATeacher", "ema_decay"]

Schedule = Literal["constant", "cosine", "warmup", "hold_cosine"]
BufferPolicy = Literal["average", "copy", "own"]
_SCHEDULES = ("constant", "cosine", "warmup", "hold_cosine")
_BUFFERS = ("average", "copy", "own")


def ema_decay(
    schedule: str,
    step: int,
    total_steps: int | None,
    decay: float,
    final_decay: float = 1.0,
    hold_fraction: float = 0.1,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
) -> float:
    """The decay ``d`` of update number ``step`` (0 for the first update) under ``schedule``.

    * ``constant``: ``d = decay``.
    * ``cosine`` (BYOL, Grill et al., NeurIPS 2020): ``d = final - (final - decay) (cos(pi k / K) + 1) / 2``,
      from ``decay`` at ``k = 0`` to ``final_decay`` (1 in BYOL) at ``k = K = total_steps``.
    * ``warmup`` (timm's ``ModelEmaV3``): ``d = min(decay, 1 - (1 + k / gamma) ** -power)``: small at first,
      so the average forgets the random initialization, then capped at ``decay``.
    * ``hold_cosine`` (AutoMix / AdAutoMix): ``decay`` for the first ``hold_fraction * K`` updates, then the
      cosine above over the remaining updates, from ``decay`` towards ``final_decay``.
    """
    if schedule == "constant":
        return decay
    if schedule == "warmup":
        return min(decay, 1.0 - (1.0 + step / warmup_gamma) ** -warmup_power)
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"the {schedule!r} EMA schedule needs the total number of steps")
    hold = hold_fraction * total_steps if schedule == "hold_cosine" else 0.0
    if step < hold:
        return decay
    progress = min(1.0, (step - hold) / max(total_steps - hold, 1e-12))
    return final_decay - (final_decay - decay) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMATeacher(pl.Callback):
    """Exponential moving average of the student's weights, as a teacher that lives in the LightningModule.

    After every optimizer step, ``teacher <- d * teacher + (1 - d) * student`` for each (student, teacher)
    pair (Polyak and Juditsky, SIAM J. Control Optim. 1992; as a teacher: Tarvainen and Valpola, "Mean
    teachers", NeurIPS 2017). Unlike Lightning's ``EMAWeightAveraging``, whose average lives inside the
    callback, the teacher is a submodule of the LightningModule: it moves with it between devices, is saved
    in its ``state_dict`` and can be called inside ``training_step`` (AdAutoMix's generator reads the
    teacher's features).

    **Which weights.** A module that defines ``ema_pairs() -> Iterable[tuple[nn.Module, nn.Module]]``
    declares its (student, teacher) pairs (the teacher an architectural copy of the student, parameters in
    the same order). Any other LightningModule gets a plain EMA of all of its parameterized children: the
    callback registers their copy as the submodule ``ema_teacher`` at ``setup`` (before the optimizer is
    made, so on resume the checkpoint's teacher weights load into it; load such a checkpoint into a module
    without the callback with ``strict=False``). Teacher parameters never require gradients.

    **When.** Once per optimizer step: the update runs in ``on_train_batch_end`` only when
    ``trainer.global_step`` has advanced since the last update, so under ``accumulate_grad_batches=k``
    there is one update per ``k`` batches. ``init_from_student`` copies the students into the teachers
    when training starts from scratch (not on resume).

    **Decay schedules** (see :func:`ema_decay`; ``k`` counts the updates, ``K = total_steps``, by default
    ``trainer.estimated_stepping_batches``): ``constant``; ``cosine`` from ``decay`` to ``final_decay``
    (BYOL uses 0.996 -> 1); ``warmup``, timm's ``1 - (1 + k / warmup_gamma) ** -warmup_power`` capped at
    ``decay``; ``hold_cosine``, AdAutoMix's ``decay`` (0.999) for the first ``hold_fraction`` (10 %) of the
    steps, then cosine to ``final_decay`` (0.999999 on CIFAR / Tiny-ImageNet, 0.99999 on ImageNet).

    **Buffers** (``buffers``): ``average`` EMA-averages floating-point buffers (BatchNorm running
    statistics) like the parameters and copies integer buffers (``num_batches_tracked``: an average of a
    counter is meaningless); ``copy`` copies every buffer from the student; ``own`` leaves all of the
    teacher's buffers alone, so its BatchNorm statistics are those of its own forward passes in train
    mode (the momentum encoders of MoCo, AutoMix and AdAutoMix do this).

    **Logged**: ``train/ema_decay``, the decay of the latest update.

    **State.** The number of updates and the last step seen are in the callback's ``state_dict``, the
    teacher weights in the module's; a resumed run continues the schedule exactly where it stopped.

    **Evaluating with the EMA weights** (``evaluate_with_ema``): for validation and test, the students'
    parameters and floating-point buffers are swapped with the teachers' and swapped back at the end of the
    epoch; a checkpoint written meanwhile still holds the training weights in the student entries.

    **Distributed.** Under DDP every rank holds the same student parameters after each step, so the
    teachers' parameters stay identical on every rank. BatchNorm statistics are rank-local between
    forwards, as DDP makes them: its buffer broadcast at the start of each forward (of the whole
    LightningModule, teacher included) hands every rank rank 0's statistics, so in effect the teacher's
    buffers are rank 0's, which is also what rank 0 saves in checkpoints.
    Sharded strategies (FSDP, DeepSpeed, model parallel) are refused at setup: a rank holds only a shard
    of the student. Precision: the update runs on the parameters as stored (float32 under
    ``bf16-mixed`` / ``16-mixed``); with ``*-true`` half precision a decay close to 1 rounds the update away.

    Args:
        decay: the (initial) decay ``d``; for ``warmup`` its cap.
        schedule: ``"constant"``, ``"cosine"``, ``"warmup"`` or ``"hold_cosine"``.
        final_decay: end of the cosine schedules.
        hold_fraction: share of the steps held at ``decay`` by ``hold_cosine``.
        warmup_gamma: ``gamma`` of the ``warmup`` schedule.
        warmup_power: ``power`` of the ``warmup`` schedule.
        total_steps: ``K`` of the cosine schedules; default ``trainer.estimated_stepping_batches``.
        buffers: ``"average"``, ``"copy"`` or ``"own"``.
        init_from_student: copy the students into the teachers at the start of a fresh fit.
        evaluate_with_ema: validate and test with the teachers' weights swapped into the students.
    """

    def __init__(
        self,
        decay: float = 0.999,
        schedule: Schedule = "constant",
        final_decay: float = 1.0,
        hold_fraction: float = 0.1,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        total_steps: int | None = None,
        buffers: BufferPolicy = "average",
        init_from_student: bool = True,
        evaluate_with_ema: bool = False,
    ) -> None:
        if schedule not in _SCHEDULES:
            raise ValueError(f"EMATeacher schedule must be one of {', '.join(_SCHEDULES)}; got {schedule!r}")
        if buffers not in _BUFFERS:
            raise ValueError(f"EMATeacher buffers must be one of {', '.join(_BUFFERS)}; got {buffers!r}")
        if not 0.0 <= decay <= 1.0 or not 0.0 <= final_decay <= 1.0:
            raise ValueError(f"decays must lie in [0, 1], got decay={decay}, final_decay={final_decay}")
        if not 0.0 <= hold_fraction < 1.0:
            raise ValueError(f"hold_fraction must lie in [0, 1), got {hold_fraction}")
        if warmup_gamma <= 0 or warmup_power <= 0:
            raise ValueError("warmup_gamma and warmup_power must be positive")
        if total_steps is not None and total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.decay = float(decay)
        self.schedule = schedule
        self.final_decay = float(final_decay)
        self.hold_fraction = float(hold_fraction)
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.total_steps = total_steps
        self.buffers = buffers
        self.init_from_student = bool(init_from_student)
        self.evaluate_with_ema = bool(evaluate_with_ema)
        self.num_updates = 0
        self.last_global_step = 0
        self.current_decay: float | None = None
        self._pairs: list[tuple[nn.Module, nn.Module]] = []
        self._lists: tuple[list[Tensor], ...] | None = None
        self._swapped = False
        self._stash: list[Tensor] = []
        self._total: int | None = None

    # -- the pairs ------------------------------------------------------------------------------------
    def _declared_pairs(self, pl_module: pl.LightningModule) -> list[tuple[nn.Module, nn.Module]]:
        if hasattr(pl_module, "ema_pairs"):
            return [tuple(pair) for pair in pl_module.ema_pairs()]  # type: ignore[misc]
        if not hasattr(pl_module, "ema_teacher"):
            children = {n: c for n, c in pl_module.named_children() if any(True for _ in c.parameters())}
            if not children:
                raise ValueError(f"EMATeacher: {type(pl_module).__name__} has no parameters to average")
            teacher = nn.ModuleDict({name: copy.deepcopy(child) for name, child in children.items()})
            teacher.requires_grad_(False)
            pl_module.ema_teacher = teacher
        teacher = pl_module.ema_teacher
        return [(getattr(pl_module, name), teacher[name]) for name in teacher]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"EMATeacher does not support strategy {strategy}: each rank holds only a shard of the student, "
                "so the teacher cannot be averaged from it; use strategy='ddp' (or a single device)"
            )
        pairs = self._declared_pairs(pl_module)
        if not pairs:
            raise ValueError(f"EMATeacher: {type(pl_module).__name__}.ema_pairs() declared no (student, teacher) pair")
        for student, teacher in pairs:
            s_shapes = [tuple(p.shape) for p in student.parameters()]
            t_shapes = [tuple(p.shape) for p in teacher.parameters()]
            if s_shapes != t_shapes:
                raise ValueError(
                    f"EMATeacher: teacher {type(teacher).__name__} is not an architectural copy of student "
                    f"{type(student).__name__} (parameter shapes differ)"
                )
            if len(list(student.buffers())) != len(list(teacher.buffers())):
                raise ValueError("EMATeacher: student and teacher have different numbers of buffers")
            teacher.requires_grad_(False)
        self._pairs = pairs
        self._lists = None

    def _tensor_lists(self) -> tuple[list[Tensor], ...]:
        if self._lists is None:
            s_par, t_par, s_avg, t_avg, s_copy, t_copy = [], [], [], [], [], []
            for student, teacher in self._pairs:
                s_par += [p.detach() for p in student.parameters()]
                t_par += [p.detach() for p in teacher.parameters()]
                if self.buffers == "own":
                    continue
                for s, t in zip(student.buffers(), teacher.buffers()):
                    if self.buffers == "average" and t.is_floating_point():
                        s_avg.append(s), t_avg.append(t)
                    else:
                        s_copy.append(s), t_copy.append(t)
            self._lists = (s_par + s_avg, t_par + t_avg, s_copy, t_copy)
        return self._lists

    # -- the update -----------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """The decay of update number ``step``."""
        return ema_decay(
            self.schedule, step, self._total, self.decay, self.final_decay, self.hold_fraction,
            self.warmup_gamma, self.warmup_power,
        )  # fmt: skip

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total = self.total_steps
        if self._total is None and self.schedule in ("cosine", "hold_cosine"):
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    f"EMATeacher schedule {self.schedule!r} needs the number of steps: set trainer max_steps or "
                    "max_epochs, or give total_steps"
                )
            self._total = int(total)
        if self.init_from_student and self.num_updates == 0 and trainer.global_step == 0:
            self.copy_student_to_teacher()

    @torch.no_grad()
    def copy_student_to_teacher(self) -> None:
        """Make every teacher equal to its student (parameters and, unless ``buffers="own"``, buffers)."""
        s_avg, t_avg, s_copy, t_copy = self._tensor_lists()
        if t_avg:
            torch._foreach_copy_(t_avg, s_avg)
        if t_copy:
            torch._foreach_copy_(t_copy, s_copy)

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step with the decay of the current update number; returns that decay."""
        d = self.decay_at(self.num_updates)
        s_avg, t_avg, s_copy, t_copy = self._tensor_lists()
        if t_avg:
            # lerp: t + (1 - d) (s - t) = d t + (1 - d) s, fused over all tensors
            torch._foreach_lerp_(t_avg, s_avg, 1.0 - d)
        if t_copy:
            torch._foreach_copy_(t_copy, s_copy)
        self.num_updates += 1
        self.current_decay = d
        return d

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps: it stays put between the micro-batches of an accumulation
        if trainer.global_step > self.last_global_step:
            self.update()
            self.last_global_step = trainer.global_step
            pl_module.log("train/ema_decay", self.current_decay, on_step=True, on_epoch=False, batch_size=1)

    # -- evaluation with the teacher's weights -----------------------------------------------------------
    def _eval_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        students, teachers = [], []
        for student, teacher in self._pairs:
            students += [p.detach() for p in student.parameters()]
            teachers += [p.detach() for p in teacher.parameters()]
            for s, t in zip(student.buffers(), teacher.buffers()):
                if s.is_floating_point():
                    students.append(s), teachers.append(t)
        return students, teachers

    @torch.no_grad()
    def _swap_in(self) -> None:
        students, teachers = self._eval_tensors()
        self._stash = [s.clone() for s in students]
        torch._foreach_copy_(students, teachers)
        self._swapped = True

    @torch.no_grad()
    def _swap_out(self) -> None:
        students, _ = self._eval_tensors()
        torch._foreach_copy_(students, self._stash)
        self._stash, self._swapped = [], False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_with_ema and self._pairs and not self._swapped:
            self._swap_in()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped:
            self._swap_out()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self._swapped:
            return
        # a checkpoint written while the teacher's weights are swapped in keeps the training weights
        by_storage = {(t.data_ptr(), tuple(t.shape)): i for i, t in enumerate(self._eval_tensors()[0])}
        state = checkpoint["state_dict"]
        for name, tensor in itertools.chain(pl_module.named_parameters(), pl_module.named_buffers()):
            index = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
            if index is not None and name in state:
                state[name] = self._stash[index].clone()

    # -- checkpoint state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_global_step": self.last_global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.last_global_step = int(state_dict["last_global_step"])
