"""EMATeacher: values against a hand computation (every schedule, every buffer policy), one update per
optimizer step under accumulation, exact resume, evaluation with the EMA weights, sharded refusal.
DDP is covered together with AdAutoMix in tests/mixup/test_adautomix.py (one 2-process run)."""

from __future__ import annotations

import copy
import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.callbacks.ema import EMATeacher, ema_decay
from tests.helpers import tiny_trainer

STEPS = 6


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g))


class Tiny(pl.LightningModule):
    """BatchNorm first, so the statistics of a forward pass depend only on the input batch."""

    def __init__(self, teacher_forward: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
        self.teacher = copy.deepcopy(self.student)
        self.teacher_forward = teacher_forward
        self.seen: list[torch.Tensor] = []

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.teacher_forward:  # the teacher's own BatchNorm statistics (AdAutoMix's use)
            self.teacher(x)
            self.seen.append(x.clone())
        return F.cross_entropy(self.student(x), y)

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=4, shuffle=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.5)


class _Record(pl.Callback):
    """The student's state after each optimizer step."""

    def __init__(self):
        self.states, self.last = [], 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step > self.last:
            self.last = trainer.global_step
            self.states.append({k: v.detach().clone().double() for k, v in pl_module.student.state_dict().items()})


def _decays(schedule, n, decay=0.9, final=0.99, total=STEPS, hold=0.34, gamma=2.0, power=0.75):
    """The schedules written out again, independently of ema_decay."""
    k = np.arange(n, dtype=np.float64)
    if schedule == "constant":
        return np.full(n, decay)
    if schedule == "warmup":
        return np.minimum(decay, 1 - (1 + k / gamma) ** (-power))
    start = hold * total if schedule == "hold_cosine" else 0.0
    p = np.clip((k - start) / (total - start), 0, 1)
    cos = final + (decay - final) * 0.5 * (1 + np.cos(np.pi * p))
    return np.where(k < start, decay, cos)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup", "hold_cosine"])
@pytest.mark.parametrize("buffers", ["average", "copy", "own"])
def test_teacher_equals_hand_computed_ema(schedule, buffers):
    module = Tiny(teacher_forward=buffers == "own")
    initial = {k: v.detach().clone().double() for k, v in module.student.state_dict().items()}
    ema = EMATeacher(decay=0.9, schedule=schedule, final_decay=0.99, hold_fraction=0.34, warmup_gamma=2.0,
                     warmup_power=0.75, buffers=buffers)  # fmt: skip
    record = _Record()
    tiny_trainer(max_steps=STEPS, callbacks=[record, ema]).fit(module)
    assert ema.num_updates == STEPS == len(record.states)

    expected = dict(initial)
    for d, state in zip(_decays(schedule, STEPS), record.states):
        for name, s in state.items():
            if name.endswith("num_batches_tracked"):
                expected[name] = s if buffers != "own" else expected[name]
            elif "running" in name and buffers == "copy":
                expected[name] = s
            elif "running" in name and buffers == "own":
                pass  # replayed below
            else:
                expected[name] = d * expected[name] + (1 - d) * s
    if buffers == "own":  # BatchNorm's momentum recursion over the batches the teacher itself saw
        mean, var = initial["0.running_mean"].clone(), initial["0.running_var"].clone()
        for x in module.seen:
            x = x.double()
            mean = 0.9 * mean + 0.1 * x.mean(0)
            var = 0.9 * var + 0.1 * x.var(0, unbiased=True)
        expected["0.running_mean"], expected["0.running_var"] = mean, var
        expected["0.num_batches_tracked"] = initial["0.num_batches_tracked"] + len(module.seen)
    teacher = module.teacher.state_dict()
    for name, value in expected.items():
        assert torch.allclose(teacher[name].double(), value, atol=1e-6, rtol=0), (schedule, buffers, name)
    assert not torch.equal(teacher["1.weight"], module.student.state_dict()["1.weight"])
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_decay_formulas_at_landmarks():
    assert ema_decay("cosine", 0, 100, 0.996) == pytest.approx(0.996)
    assert ema_decay("cosine", 50, 100, 0.996) == pytest.approx(0.998)
    assert ema_decay("cosine", 100, 100, 0.996) == pytest.approx(1.0)
    assert ema_decay("warmup", 0, None, 0.9999) == 0.0  # forgets the initialization at once
    assert ema_decay("warmup", 10**9, None, 0.9999) == 0.9999
    # AdAutoMix: 0.999 for the first 10 %, then half way to 0.999999 at the middle of the rest
    assert ema_decay("hold_cosine", 99, 1000, 0.999, 0.999999) == 0.999
    assert ema_decay("hold_cosine", 550, 1000, 0.999, 0.999999) == pytest.approx((0.999 + 0.999999) / 2)
    with pytest.raises(ValueError, match="needs the total number of steps"):
        ema_decay("cosine", 0, None, 0.9)


def test_one_update_per_optimizer_step_under_accumulation():
    module = Tiny()
    ema, record = EMATeacher(decay=0.8), _Record()
    tiny_trainer(max_epochs=1, accumulate_grad_batches=3, callbacks=[record, ema]).fit(module)
    assert ema.num_updates == 2 == len(record.states)  # 6 batches / 3
    expected = {k: v.double() for k, v in record.states[0].items()}
    initial = Tiny().student.state_dict()
    first = 0.8 * initial["1.weight"].double() + 0.2 * record.states[0]["1.weight"]
    w = 0.8 * first + 0.2 * record.states[1]["1.weight"]
    assert torch.allclose(module.teacher.state_dict()["1.weight"].double(), w, atol=1e-6)
    assert expected  # the recorded states are the ones at the two optimizer steps


class _StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


@pytest.mark.parametrize("buffers", ["average", "own"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, buffers):
    def make():
        return Tiny(teacher_forward=buffers == "own"), EMATeacher(decay=0.9, schedule="hold_cosine", final_decay=0.99,
                                                                    hold_fraction=0.2, buffers=buffers)  # fmt: skip

    full, ema_full = make()
    tiny_trainer(max_epochs=2, callbacks=[ema_full]).fit(full)

    part, ema_part = make()
    trainer = tiny_trainer(max_epochs=2, callbacks=[ema_part, _StopAfterFirstEpoch()])
    trainer.fit(part)  # "crashes" after the first of two epochs
    assert ema_part.num_updates == STEPS
    trainer.save_checkpoint(tmp_path / "crash.ckpt")
    resumed, ema_resumed = make()
    tiny_trainer(max_epochs=2, callbacks=[ema_resumed]).fit(resumed, ckpt_path=tmp_path / "crash.ckpt")
    assert ema_resumed.num_updates == ema_full.num_updates == 2 * STEPS
    assert ema_resumed.current_decay == ema_full.current_decay
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


class Plain(pl.LightningModule):
    """No ema_pairs(): the callback makes the teacher."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3)
        self.checkpoint_path = None
        self.val_weight_sums: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        # a row: under cross-entropy the rows of a softmax layer keep their total
        self.val_weight_sums.append(float(self.net.weight[0].sum()))
        if self.checkpoint_path is not None and batch_idx == 0:
            self.trainer.save_checkpoint(self.checkpoint_path)  # written while the EMA weights are in
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=4)

    def val_dataloader(self):
        return DataLoader(_data(8, seed=1), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.5)


def test_plain_ema_of_any_module_and_evaluation_with_the_ema_weights(tmp_path):
    module = Plain()
    module.checkpoint_path = tmp_path / "during_val.ckpt"
    ema = EMATeacher(decay=0.7, evaluate_with_ema=True)
    trainer = tiny_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[ema])
    trainer.fit(module)
    assert isinstance(module.ema_teacher, nn.ModuleDict) and "ema_teacher.net.weight" in module.state_dict()
    teacher_sum = float(module.ema_teacher["net"].weight[0].sum())
    assert module.val_weight_sums[-1] == pytest.approx(teacher_sum)  # validated with the teacher's weights
    assert float(module.net.weight[0].detach().sum()) != pytest.approx(teacher_sum)  # training weights are back
    saved = torch.load(module.checkpoint_path, weights_only=False)["state_dict"]
    assert torch.equal(saved["net.weight"], module.net.weight)  # no leak of the EMA weights
    assert torch.equal(saved["ema_teacher.net.weight"], module.ema_teacher["net"].weight)

    loss_student = trainer.validate(module, verbose=False)[0]["val/loss"]
    ema.evaluate_with_ema = False
    loss_plain = trainer.validate(module, verbose=False)[0]["val/loss"]
    assert loss_student != loss_plain


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_are_refused(strategy):
    fake = types.SimpleNamespace(strategy=strategy.__new__(strategy))
    with pytest.raises(ValueError, match="use strategy='ddp'"):
        EMATeacher().setup(fake, Tiny(), "fit")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        EMATeacher(schedule="linear")
    with pytest.raises(ValueError, match="buffers must be one of"):
        EMATeacher(buffers="mean")


# DDP (ranks identical, 2 gloo processes): tests/mixup/test_adautomix.py,
# test_ddp_student_teacher_and_generator_identical_on_both_ranks
