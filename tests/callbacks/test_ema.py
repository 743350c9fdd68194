"""EMATeacher: values against a hand computation (every schedule, every buffer policy), one update per
optimizer step under accumulation and per batch with several optimizers, exact resume (the cosine horizon
kept), a fresh teacher for a fresh fit, parameters directly on the module, the teacher in the callback's
checkpoint state (a plain load_from_checkpoint stays strict), evaluation with the EMA weights, sharded refusal.
DDP: declared teachers together with AdAutoMix in tests/mixup/test_adautomix.py (one 2-process run), the
callback's own teacher here (one 2-process run)."""

from __future__ import annotations

import copy
import types
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.callbacks.ema import EMATeacher, ema_decay
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer

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
    """The student's state after each batch that stepped an optimizer."""

    def __init__(self, get=lambda module: module.student.state_dict()):
        self.states, self.last, self.get = [], 0, get

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step > self.last:
            self.last = trainer.global_step
            self.states.append({k: v.detach().clone().double() for k, v in self.get(pl_module).items()})


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(max_epochs=2, callbacks=[ema_resumed]).fit(resumed, ckpt_path=tmp_path / "crash.ckpt")
    assert not [w for w in caught if "EMATeacher" in str(w.message)]  # the same horizon: nothing to warn about
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
    assert set(module.state_dict()) == {"net.weight", "net.bias"}  # the teacher is the callback's, not the module's
    teacher = ema.teacher_weights()
    teacher_sum = float(teacher["net.weight"][0].sum())
    assert module.val_weight_sums[-1] == pytest.approx(teacher_sum)  # validated with the teacher's weights
    assert float(module.net.weight[0].detach().sum()) != pytest.approx(teacher_sum)  # training weights are back
    saved = torch.load(module.checkpoint_path, weights_only=False)
    assert torch.equal(saved["state_dict"]["net.weight"], module.net.weight)  # no leak of the EMA weights
    assert torch.equal(saved["callbacks"][ema.state_key]["teacher"]["net.weight"], teacher["net.weight"])

    loss_student = trainer.validate(module, verbose=False)[0]["val/loss"]
    ema.evaluate_with_ema = False
    loss_plain = trainer.validate(module, verbose=False)[0]["val/loss"]
    assert loss_student != loss_plain


class Bare(pl.LightningModule):
    """No ema_pairs(), BatchNorm, and a parameter registered directly on the LightningModule (a logit scale)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.val_scales: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.scale * self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_scales.append(self.scale.detach().clone())
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.scale * self.net(x), y))

    def train_dataloader(self):
        return DataLoader(_data(), batch_size=4)

    def val_dataloader(self):
        return DataLoader(_data(8, seed=1), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _bare_state(module):
    return {"scale": module.scale, **{f"net.{k}": v for k, v in module.net.state_dict().items()}}


def _teacher(module, ema):
    """The teacher's tensors: submodules of a module with ema_pairs(), the callback's for any other."""
    if isinstance(module, Tiny):
        return module.teacher.state_dict()
    return ema.teacher_weights()


def test_parameters_directly_on_the_module_are_averaged_and_evaluated():
    module, record = Bare(), _Record(_bare_state)
    initial = {k: v.detach().clone().double() for k, v in _bare_state(module).items()}
    ema = EMATeacher(decay=0.7, evaluate_with_ema=True)
    tiny_trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1, callbacks=[record, ema]).fit(module)
    assert ema.num_updates == STEPS == len(record.states)
    expected = dict(initial)
    for state in record.states:
        for name, s in state.items():
            expected[name] = s if name.endswith("num_batches_tracked") else 0.7 * expected[name] + 0.3 * s
    # the scale moved enough for the teacher's value to be told from the student's
    assert abs(float(expected["scale"]) - float(record.states[-1]["scale"])) > 1e-3
    assert module.val_scales and torch.allclose(module.val_scales[-1].double(), expected["scale"], atol=1e-6, rtol=0)
    teacher = ema.teacher_weights()
    for name, value in expected.items():
        assert torch.allclose(teacher[name].double(), value, atol=1e-6, rtol=0), name
    assert torch.equal(module.scale.detach().double(), record.states[-1]["scale"])  # the student's value is back


@pytest.mark.parametrize("kind", ["pairs", "plain"])
def test_a_second_fresh_fit_starts_a_fresh_teacher(kind):
    make = Tiny if kind == "pairs" else Bare
    ema = EMATeacher(decay=0.9, schedule="cosine", final_decay=0.99)
    tiny_trainer(max_epochs=1, limit_val_batches=0, callbacks=[ema]).fit(make())
    again = make()
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[ema]).fit(again)

    reference, new = make(), EMATeacher(decay=0.9, schedule="cosine", final_decay=0.99)
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[new]).fit(reference)
    assert ema.num_updates == new.num_updates == 2 * STEPS
    assert ema.current_decay == new.current_decay
    expected = _teacher(reference, new)
    for name, value in _teacher(again, ema).items():
        assert torch.equal(value, expected[name]), name


class _TeacherAtStart(pl.Callback):
    def __init__(self, ema):
        self.ema, self.teacher = ema, None

    def on_train_start(self, trainer, pl_module):
        self.teacher = {k: v.clone() for k, v in self.ema.teacher_weights().items()}


def _hold_cosine_ema():
    return EMATeacher(decay=0.9, schedule="hold_cosine", final_decay=0.99, hold_fraction=0.2)


def _uninterrupted_and_crashed(checkpoint):
    """A 2-epoch run, and the same run stopped after its first epoch and saved to ``checkpoint``."""
    full, ema_full = Bare(), _hold_cosine_ema()
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[ema_full]).fit(full)
    part, ema_part = Bare(), _hold_cosine_ema()
    trainer = tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[ema_part, _StopAfterFirstEpoch()])
    trainer.fit(part)
    trainer.save_checkpoint(checkpoint)
    return (full, ema_full), (part, ema_part)


@pytest.mark.parametrize("same_callback", [False, True], ids=["new-callback", "same-callback"])
def test_checkpoint_loads_into_a_plain_module_and_resume_restores_the_teacher(tmp_path, same_callback):
    (full, ema_full), (part, ema_part) = _uninterrupted_and_crashed(tmp_path / "crash.ckpt")
    loaded = Bare.load_from_checkpoint(tmp_path / "crash.ckpt")  # strict: no teacher keys in the module's state
    for name, value in part.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    at_crash = {k: v.clone() for k, v in ema_part.teacher_weights().items()}

    resumed, ema_resumed = Bare(), ema_part if same_callback else _hold_cosine_ema()
    probe = _TeacherAtStart(ema_resumed)
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[ema_resumed, probe]).fit(
        resumed, ckpt_path=tmp_path / "crash.ckpt"
    )
    assert probe.teacher.keys() == at_crash.keys()
    for name, value in at_crash.items():
        assert torch.equal(probe.teacher[name], value), name
    assert ema_resumed.num_updates == ema_full.num_updates == 2 * STEPS
    for name, value in ema_full.teacher_weights().items():
        assert torch.equal(ema_resumed.teacher_weights()[name], value), name
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_resume_from_a_checkpoint_with_the_teacher_in_the_module_state(tmp_path):
    """Checkpoints of earlier versions held the teacher as the module's `ema_teacher.*` entries: resuming from
    one loads strictly and continues from that teacher."""

    (_, ema_full), _ = _uninterrupted_and_crashed(tmp_path / "new.ckpt")
    # rewrite it in the earlier layout: the teacher under ema_teacher.* in the module's state
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("EMATeacher")]
    teacher = checkpoint["callbacks"][key].pop("teacher")
    checkpoint["state_dict"].update({f"ema_teacher.{name}": value for name, value in teacher.items()})
    torch.save(checkpoint, tmp_path / "old.ckpt")

    resumed, ema_resumed = Bare(), _hold_cosine_ema()
    probe = _TeacherAtStart(ema_resumed)
    tiny_trainer(max_epochs=2, limit_val_batches=0, callbacks=[ema_resumed, probe]).fit(
        resumed, ckpt_path=tmp_path / "old.ckpt"
    )
    for name, value in teacher.items():
        assert torch.equal(probe.teacher[name], value), name
    for name, value in ema_full.teacher_weights().items():
        assert torch.equal(ema_resumed.teacher_weights()[name], value), name


def test_resume_keeps_the_saved_cosine_horizon_and_warns_once(tmp_path):
    def make():
        return Tiny(), EMATeacher(decay=0.9, schedule="cosine", final_decay=0.99)

    part, ema_part = make()
    trainer = tiny_trainer(max_epochs=2, callbacks=[ema_part, _StopAfterFirstEpoch()])
    trainer.fit(part)  # planned for 2 epochs (horizon 12 updates), stopped after the first
    trainer.save_checkpoint(tmp_path / "crash.ckpt")

    resumed, ema_resumed = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(max_epochs=3, callbacks=[ema_resumed]).fit(resumed, ckpt_path=tmp_path / "crash.ckpt")
    horizon = [w for w in caught if "EMATeacher" in str(w.message) and "horizon" in str(w.message)]
    assert len(horizon) == 1, [str(w.message) for w in caught]
    assert "12" in str(horizon[0].message) and "18" in str(horizon[0].message)

    # the same 3 epochs uninterrupted, with the horizon of the original plan
    full = Tiny()
    ema_full = EMATeacher(decay=0.9, schedule="cosine", final_decay=0.99, total_steps=2 * STEPS)
    tiny_trainer(max_epochs=3, callbacks=[ema_full]).fit(full)
    assert ema_resumed.num_updates == ema_full.num_updates == 3 * STEPS
    assert ema_resumed.current_decay == ema_full.current_decay == 0.99
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class TwoOptimizers(Tiny):
    """Manual optimization: the linear layer and the BatchNorm affine each have an optimizer, both step per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.student(x), y)
        first, second = self.optimizers()
        first.zero_grad(), second.zero_grad()
        self.manual_backward(loss)
        first.step(), second.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.student[1].parameters(), lr=0.5),
                torch.optim.SGD(self.student[0].parameters(), lr=0.5))  # fmt: skip


def test_several_optimizers_make_one_update_per_batch():
    module, record = TwoOptimizers(), _Record()
    initial = {k: v.detach().clone().double() for k, v in module.student.state_dict().items()}
    ema = EMATeacher(decay=0.9, schedule="cosine", final_decay=0.99)
    trainer = tiny_trainer(max_epochs=1, callbacks=[record, ema])
    trainer.fit(module)
    assert trainer.global_step == 2 * STEPS  # Lightning counts both optimizers' steps
    assert ema.num_updates == STEPS == len(record.states)  # one update per batch, over a horizon of 6 batches
    expected = dict(initial)
    for d, state in zip(_decays("cosine", STEPS), record.states):
        for name, s in state.items():
            expected[name] = s if name.endswith("num_batches_tracked") else d * expected[name] + (1 - d) * s
    teacher = module.teacher.state_dict()
    for name, value in expected.items():
        assert torch.allclose(teacher[name].double(), value, atol=1e-6, rtol=0), name


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
    # a teacher kept in the callback never runs a forward pass, so it has no statistics of its own
    with pytest.raises(ValueError, match="buffers='own' needs teachers that run their own forward passes"):
        EMATeacher(buffers="own").setup(types.SimpleNamespace(strategy=object()), Bare(), "fit")


class _RanksEvaluateOneTeacher(Bare):
    def validation_step(self, batch, batch_idx):
        ema = next(c for c in self.trainer.callbacks if isinstance(c, EMATeacher))
        teacher = ema.teacher_weights()
        for name in ("net.0.running_mean", "net.0.running_var", "net.1.weight", "scale"):
            gathered = self.all_gather(teacher[name])
            assert torch.equal(gathered[0], gathered[1]), f"{name} differs between ranks"
        self.val_scales.append(self.scale.detach().clone())
        return super().validation_step(batch, batch_idx)


@pytest.mark.slow
def test_ddp_ranks_evaluate_the_same_callback_teacher():
    """The callback's teacher is outside the module, so DDP's buffer broadcast misses it: the BatchNorm
    statistics averaged from each rank's own batches would differ between ranks without the broadcast."""
    tiny_trainer(strategy=SpawnDDP(), devices=2, max_epochs=1, num_sanity_val_steps=0,
                 callbacks=[EMATeacher(decay=0.7, evaluate_with_ema=True)]).fit(_RanksEvaluateOneTeacher())  # fmt: skip


# DDP with declared teachers (ranks identical, 2 gloo processes): tests/mixup/test_adautomix.py,
# test_ddp_student_teacher_and_generator_identical_on_both_ranks
