"""EMATeacher: exponential moving average of a module's weights, as a teacher for training and evaluation."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mtl._distributed import broadcast_

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
    """Exponential moving average of the student's weights, as a teacher.

    After every optimizer step, ``teacher <- d * teacher + (1 - d) * student`` for each (student, teacher)
    pair (Polyak and Juditsky, SIAM J. Control Optim. 1992; as a teacher: Tarvainen and Valpola, "Mean
    teachers", NeurIPS 2017).

    **Which weights, and where they live.** A module that defines
    ``ema_pairs() -> Iterable[tuple[nn.Module, nn.Module]]`` owns its teachers: each pair is a student and
    its architectural copy (parameters in the same order), both submodules, so the teacher moves with the
    module, is saved in its ``state_dict`` and can be called inside ``training_step`` (AdAutoMix's generator
    reads the teacher's features; its evaluated model is the teacher). Any other LightningModule gets an
    EMA of all of its parameters and persistent buffers, those registered directly on it included, kept
    in the callback as Lightning's ``WeightAveraging`` keeps its average: the teacher is saved in the
    callback's checkpoint state, so the module's own ``state_dict`` holds the student alone and a plain
    ``Model.load_from_checkpoint(path)`` stays strict; :meth:`teacher_weights` gives the teacher under the
    module's names. Such a teacher runs no forward pass, so ``buffers="own"`` is refused for it. Teacher
    parameters never require gradients.

    **When.** Once per training batch in which an optimizer stepped: the update runs in
    ``on_train_batch_end`` when ``trainer.global_step`` has advanced since the last update. Under
    ``accumulate_grad_batches=k`` that is one update per ``k`` batches. Under manual optimization with
    several optimizers stepping in one batch it is still one update for that batch, although Lightning's
    ``global_step`` counts every optimizer's step: the decay then means the same whether the parameters
    sit in one optimizer or in several (a split into parameter groups does not square it), and the updates
    are what ``trainer.estimated_stepping_batches`` counts (with several optimizers and ``max_steps``, which
    counts each optimizer's step, give ``total_steps``).

    **Fresh and resumed fits.** A fit that restores the callback from a checkpoint
    (``trainer.fit(..., ckpt_path=...)``) continues the teacher, the update count and the schedule. Any
    other fit starts a fresh teacher: the count restarts at 0 and, with ``init_from_student``, the students
    are copied into the teachers, so a callback reused for a second ``fit`` tracks the new run as a new
    callback would. (The same Trainer fitted again, its ``global_step`` where the callback left it,
    continues.)

    **Decay schedules** (see :func:`ema_decay`; ``k`` counts the updates, ``K = total_steps``, by default
    ``trainer.estimated_stepping_batches`` of the fit that started the teacher): ``constant``; ``cosine``
    from ``decay`` to ``final_decay`` (BYOL uses 0.996 -> 1); ``warmup``, timm's
    ``1 - (1 + k / warmup_gamma) ** -warmup_power`` capped at ``decay``; ``hold_cosine``, AdAutoMix's
    ``decay`` (0.999) for the first ``hold_fraction`` (10 %) of the steps, then cosine to ``final_decay``
    (0.999999 on CIFAR / Tiny-ImageNet, 0.99999 on ImageNet). ``K`` is saved with the callback: a resumed
    run keeps it, as the interrupted run would have, and warns once if its own estimate differs (an
    explicit ``total_steps`` replaces it).

    **Buffers** (``buffers``): ``average`` EMA-averages floating-point buffers (BatchNorm running
    statistics) like the parameters and copies integer buffers (``num_batches_tracked``: an average of a
    counter is meaningless); ``copy`` copies every buffer from the student; ``own`` leaves all of the
    teacher's buffers alone, so its BatchNorm statistics are those of its own forward passes in train
    mode (the momentum encoders of MoCo, AutoMix and AdAutoMix do this).

    **Logged**: ``train/ema_decay``, the decay of the latest update.

    **State.** The number of updates, the last step seen, ``K`` and (for modules without ``ema_pairs()``)
    the teacher are in the callback's ``state_dict``; a resumed run continues exactly where it stopped.

    **Evaluating with the EMA weights** (``evaluate_with_ema``): for validation and test, the students'
    parameters and floating-point buffers are swapped with the teachers' and swapped back at the end of the
    epoch; a checkpoint written meanwhile still holds the training weights in the student entries.

    **Distributed.** Under DDP every rank holds the same student parameters after each step, so the
    teachers' parameters stay identical on every rank. BatchNorm statistics are rank-local between
    forwards, as DDP makes them: its buffer broadcast at the start of each forward of the LightningModule
    hands every rank rank 0's statistics, for teachers that are submodules too; a teacher kept in the
    callback gets rank 0's floating-point buffers broadcast before each evaluation with the EMA weights.
    Either way the teacher's buffers are in effect rank 0's, which is also what rank 0 saves in checkpoints.
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
        self._module: pl.LightningModule | None = None
        self._pairs: list[tuple[nn.Module, nn.Module]] = []  # declared by ema_pairs()
        self._teacher: dict[str, Tensor] | None = None  # the callback's own teacher, by the module's names
        self._pending: dict[str, Tensor] | None = None  # a teacher loaded from a checkpoint, placed at _ready
        self._restored = False
        self._legacy = False  # _pending came from a module state of an earlier version
        self._lists: tuple[list[Tensor], ...] | None = None
        self._swapped = False
        self._stash: list[Tensor] = []
        self._total: int | None = None
        self._saved_total: int | None = None

    # -- the pairs ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
            raise ValueError(
                f"EMATeacher does not support strategy {strategy}: each rank holds only a shard of the student, "
                "so the teacher cannot be averaged from it; use strategy='ddp' (or a single device)"
            )
        self._restored = False  # set by load_state_dict, which runs after setup, when a checkpoint has our state
        self._lists = None
        if pl_module is not self._module:
            self._teacher = None  # a teacher of another module
        self._module = pl_module
        if not hasattr(pl_module, "ema_pairs"):
            if self.buffers == "own":
                raise ValueError(
                    f"EMATeacher buffers='own' needs teachers that run their own forward passes, but "
                    f"{type(pl_module).__name__} declares no ema_pairs(), so its teacher is the callback's and never "
                    "runs; use buffers='average' or 'copy', or declare the teacher submodules with ema_pairs()"
                )
            self._pairs = []
            if not getattr(pl_module, "_ema_legacy_hook", False):
                pl_module._register_load_state_dict_pre_hook(self._take_legacy_teacher, with_module=False)
                pl_module._ema_legacy_hook = True  # type: ignore[assignment]  # a plain flag, not a tensor or module
            return
        pairs = [tuple(pair) for pair in pl_module.ema_pairs()]  # type: ignore[operator]
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
        self._teacher = None

    def _take_legacy_teacher(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        # checkpoints of earlier versions kept this teacher in the module as `ema_teacher.*`: take it out of
        # the module's state (so strict loading works) and use it, unless the callback's state brings one
        legacy = {
            k[len(prefix) + 12 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "ema_teacher.")
        }
        if legacy and self._pending is None:
            self._pending, self._legacy = legacy, True

    @staticmethod
    def _student_tensors(pl_module: pl.LightningModule) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
        """The module's parameters and persistent buffers, by their ``state_dict`` names."""
        saved = set(pl_module.state_dict(keep_vars=True))
        params = [(n, p.detach()) for n, p in pl_module.named_parameters()]
        return params, [(n, b) for n, b in pl_module.named_buffers() if n in saved]

    def _ready(self, pl_module: pl.LightningModule) -> None:
        """Make the callback's teacher (or place it where its students now are), with a restored one loaded."""
        self._lists = None  # the strategy may have moved the students since the lists were made
        if self._pairs:
            self._pending = None  # declared teachers are restored with the module
            return
        params, buffers = self._student_tensors(pl_module)
        if not params:
            raise ValueError(f"EMATeacher: {type(pl_module).__name__} has no parameters to average")
        students = dict(params + buffers)
        if self._pending is not None and self._legacy:
            # that teacher had no entries for tensors registered on the module itself: start those from the student
            self._pending = {**{n: t for n, t in students.items() if n not in self._pending}, **self._pending}
        self._legacy = False
        source = self._pending if self._pending is not None else self._teacher
        if self._pending is not None and self._pending.keys() != students.keys():
            missing, unexpected = students.keys() - self._pending.keys(), self._pending.keys() - students.keys()
            raise ValueError(
                f"EMATeacher: the checkpoint's teacher does not match {type(pl_module).__name__}: missing "
                f"{sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        if source is None or source.keys() != students.keys():
            source = {n: s.clone() for n, s in students.items()}
        self._teacher = {n: source[n].detach().to(device=s.device, dtype=s.dtype) for n, s in students.items()}
        self._pending = None

    def _tensors(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Student parameters, teacher parameters, student buffers, teacher buffers, paired by position."""
        s_par, t_par, s_buf, t_buf = [], [], [], []
        if self._pairs:
            for student, teacher in self._pairs:
                s_par += [p.detach() for p in student.parameters()]
                t_par += [p.detach() for p in teacher.parameters()]
                s_buf += list(student.buffers())
                t_buf += list(teacher.buffers())
        elif self._teacher is not None and self._module is not None:
            params, buffers = self._student_tensors(self._module)
            s_par, t_par = [p for _, p in params], [self._teacher[n] for n, _ in params]
            s_buf, t_buf = [b for _, b in buffers], [self._teacher[n] for n, _ in buffers]
        return s_par, t_par, s_buf, t_buf

    def _tensor_lists(self) -> tuple[list[Tensor], ...]:
        if self._lists is None:
            s_avg, t_avg, s_buf, t_buf = self._tensors()
            s_copy, t_copy = [], []
            if self.buffers != "own":
                for s, t in zip(s_buf, t_buf):
                    if self.buffers == "average" and t.is_floating_point():
                        s_avg.append(s)
                        t_avg.append(t)
                    else:
                        s_copy.append(s)
                        t_copy.append(t)
            self._lists = (s_avg, t_avg, s_copy, t_copy)
        return self._lists

    def teacher_weights(self) -> dict[str, Tensor]:
        """The callback's teacher of a module without ``ema_pairs()``: its parameters and persistent buffers
        under the module's ``state_dict`` names, so ``model.load_state_dict(ema.teacher_weights(), strict=False)``
        makes a model of the EMA weights (strict where the state holds nothing else)."""
        if self._pairs:
            raise ValueError("EMATeacher: this module declares its teachers with ema_pairs(); read them from it")
        if self._teacher is None:
            raise ValueError("EMATeacher has no teacher yet: it is made when fit, validate or test starts")
        return dict(self._teacher)

    # -- the update -----------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """The decay of update number ``step``."""
        return ema_decay(
            self.schedule, step, self._total, self.decay, self.final_decay, self.hold_fraction,
            self.warmup_gamma, self.warmup_power,
        )  # fmt: skip

    def _estimated_total(self, trainer: pl.Trainer, needed: bool) -> int | None:
        total = trainer.estimated_stepping_batches
        if math.isfinite(total):
            return int(total)
        if needed:
            raise ValueError(
                f"EMATeacher schedule {self.schedule!r} needs the number of steps: set trainer max_steps or "
                "max_epochs, or give total_steps"
            )
        return None

    def _horizon(self, trainer: pl.Trainer, saved: int | None) -> int | None:
        """``K`` of the cosine schedules: an explicit ``total_steps``, else the saved one, else this run's estimate."""
        if self.schedule not in ("cosine", "hold_cosine"):
            return saved
        if saved is None:
            return self.total_steps or self._estimated_total(trainer, needed=True)
        here = self.total_steps or self._estimated_total(trainer, needed=False)
        if here is not None and here != saved:
            if self.total_steps is not None:
                rank_zero_warn(
                    f"EMATeacher: total_steps={here} replaces the cosine horizon of {saved} updates the callback's "
                    "state was saved with, so the decay jumps where the run resumes"
                )
                return here
            rank_zero_warn(
                f"EMATeacher: the callback's state was saved with a cosine horizon of {saved} updates, but this "
                f"run's trainer.estimated_stepping_batches is {here}; the schedule keeps {saved}, as the interrupted "
                f"run would have (give total_steps={here} to use this run's length instead)"
            )
        return saved

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ready(pl_module)
        # the loops restore global_step after this hook, so a positive one is this Trainer's own earlier fit
        resumed, self._restored = self._restored, False
        continued = not resumed and 0 < trainer.global_step == self.last_global_step
        if resumed or continued:
            self._total = self._horizon(trainer, self._saved_total if resumed else self._total)
            return
        self.num_updates, self.last_global_step, self.current_decay = 0, 0, None
        self._total = self._horizon(trainer, None)
        if self.init_from_student:
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
        # global_step counts optimizer steps: it stays put between the micro-batches of an accumulation, and
        # moves by one per optimizer under manual optimization, where this is still one update per batch
        if trainer.global_step > self.last_global_step:
            self.update()
            self.last_global_step = trainer.global_step
            assert self.current_decay is not None  # update() has just set it
            pl_module.log("train/ema_decay", self.current_decay, on_step=True, on_epoch=False, batch_size=1)

    # -- evaluation with the teacher's weights -----------------------------------------------------------
    def _eval_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        s_par, t_par, s_buf, t_buf = self._tensors()
        floats = [(s, t) for s, t in zip(s_buf, t_buf) if s.is_floating_point()]
        return s_par + [s for s, _ in floats], t_par + [t for _, t in floats]

    @torch.no_grad()
    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ready(pl_module)
        if not self._pairs and trainer.world_size > 1:
            # DDP's buffer broadcast skips a teacher outside the module: every rank evaluates rank 0's statistics
            broadcast_((t for t in self._tensors()[3] if t.is_floating_point()), src=0)
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
        if self.evaluate_with_ema and self._module is pl_module and not self._swapped:
            self._swap_in(trainer, pl_module)

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
        # restored but not fitted yet: the horizon is the loaded one (on_fit_start moves it to _total)
        total = self._saved_total if self._restored else self._total
        state: dict[str, Any] = {
            "num_updates": self.num_updates, "last_global_step": self.last_global_step, "total_steps": total,
        }  # fmt: skip
        teacher = self._pending if self._pending is not None else self._teacher
        if teacher is not None:
            state["teacher"] = dict(teacher)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])
        self.last_global_step = int(state_dict["last_global_step"])
        self._saved_total = state_dict.get("total_steps")  # absent from checkpoints of earlier versions
        if state_dict.get("teacher") is not None:
            self._pending = dict(state_dict["teacher"])
        self._restored = True
