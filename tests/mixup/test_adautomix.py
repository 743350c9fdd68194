"""AdAutoMix / AutoMix: masks sum to 1 per pixel, each phase reaches only its own parameters, the
adversarial objective and its cosine sign, the lambda margin, training with EMATeacher, DDP."""

from __future__ import annotations

import functools
import types

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl.architectures.resnet_cifar import CifarResNet
from lightning_mtl.callbacks.ema import EMATeacher
from lightning_mtl.datamodules.digits import Digits
from lightning_mtl.mixup.adautomix import AdAutoMix, AutoMix
from lightning_mtl.mixup.generator import MixMaskGenerator
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer


def _model(cls=AdAutoMix, **kwargs):
    torch.manual_seed(0)
    encoder = CifarResNet((1, 1, 1, 1), in_channels=1, width=4)  # layer3: 16 channels at 1/4 of the side
    defaults = dict(num_classes=10, feature_channels=16, task_name="digit",
                    optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))  # fmt: skip
    defaults.update(kwargs)
    return cls(encoder, **defaults)


def _batch(n=8, side=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def _ema():
    return EMATeacher(decay=0.9, schedule="hold_cosine", final_decay=0.999, buffers="own")


@pytest.mark.parametrize("k", [2, 3])
def test_generator_masks_sum_to_one_per_pixel(k):
    torch.manual_seed(0)
    generator = MixMaskGenerator(16, lam_concat=True)
    masks = generator([torch.randn(4, 16, 4, 4) for _ in range(k)], torch.full((k,), 1 / k), (16, 16))
    assert masks.shape == (4, k, 16, 16) and (masks > 0).all()
    assert torch.allclose(masks.sum(1), torch.ones(4, 16, 16), atol=1e-6)
    model = _model(mix_samples=k)
    out = model.training_losses(*_batch(), adversarial=True)
    assert torch.allclose(out["masks"].sum(1), torch.ones(8, 16, 16), atol=1e-6)
    # the generated image is the per-pixel mix of its sources
    x, _ = _batch()
    expected = sum(out["masks"][:, j : j + 1] * x[out["mixed"].sources[:, j]] for j in range(k))
    assert torch.allclose(out["mixed"].inputs, expected, atol=1e-6)


def test_generator_checkpoint_with_the_old_key_and_value_biases_loads():
    generator = MixMaskGenerator(16)
    state = generator.state_dict()
    state["key.bias"], state["value.bias"] = torch.ones(8), torch.ones(1)
    fresh = MixMaskGenerator(16)
    fresh.load_state_dict(state)  # strict: the two stale biases are dropped, every live tensor is loaded
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in generator.state_dict().items())


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("adversarial", [False, True], ids=["cooperative", "adversarial"])
@pytest.mark.parametrize("k", [2, 3])
def test_each_loss_reaches_only_its_own_parameters(adversarial, k):
    model = _model(mix_samples=k, lam_margin=0.0)
    x, y = _batch()
    for part, owner in (("student", ("encoder.", "head.")), ("generator", ("generator.",))):
        model.zero_grad(set_to_none=True)
        out = model.training_losses(x, y, adversarial=adversarial)
        out[part].backward()
        grads = _grads(model)
        # relative to the largest gradient of the part: a parameter whose gradient is zero by construction
        # shows rounding noise (1e-11..1e-7 of the largest here), a live one at least 1e-4 of it
        largest = max(g.abs().max() for n, g in grads.items() if n.startswith(owner) and g is not None)
        for name, grad in grads.items():
            if name.startswith(owner):
                assert grad is not None and grad.abs().max() > 1e-6 * largest, (
                    f"{part} loss gives no gradient to {name}"
                )
            else:
                assert grad is None, f"{part} loss leaks a gradient into {name}"
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("teacher_"))


@pytest.mark.parametrize("sign", ["paper", "code"])
def test_adversarial_objective_and_cosine_sign(sign):
    model = _model(beta=0.3, cosine_sign=sign)
    x, y = _batch()
    torch.manual_seed(5)
    cooperative = model.training_losses(x, y, adversarial=False)
    torch.manual_seed(5)
    adversarial = model.training_losses(x, y, adversarial=True)
    mix_loss, similarity = cooperative["generator"], adversarial["similarity"]
    assert torch.allclose(adversarial["generator_mix_loss"], mix_loss.detach())
    cosine = (1 - similarity) if sign == "paper" else similarity
    assert torch.allclose(adversarial["generator"], -0.3 * mix_loss + 0.7 * cosine, atol=1e-6)


def _generator_grad(model, x, y, adversarial, seed=5):
    torch.manual_seed(seed)
    loss = model.training_losses(x, y, adversarial=adversarial)["generator"]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.generator.parameters()))])


def test_gradient_signs_of_the_two_phases_and_of_the_cosine_term():
    x, y = _batch()
    # beta = 1: the adversarial step ascends exactly the loss that the cooperative step descends
    model = _model(beta=1.0)
    cooperative, adversarial = _generator_grad(model, x, y, False), _generator_grad(model, x, y, True)
    assert cooperative.abs().sum() > 0 and torch.allclose(adversarial, -cooperative, atol=1e-7)
    # beta = 0: only the cosine term; the paper's sign (minimize 1 - S) is the code's (minimize S) reversed
    paper = _generator_grad(_model(beta=0.0, cosine_sign="paper"), x, y, True)
    code = _generator_grad(_model(beta=0.0, cosine_sign="code"), x, y, True)
    assert paper.abs().sum() > 0 and torch.allclose(paper, -code, atol=1e-7)
    # a small step along the paper's descent direction raises the similarity S
    model = _model(beta=0.0, cosine_sign="paper")
    torch.manual_seed(5)
    before = model.training_losses(x, y, adversarial=True)["similarity"]
    with torch.no_grad():
        offset = 0
        for p in model.generator.parameters():
            p -= 0.5 * paper[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    torch.manual_seed(5)
    assert model.training_losses(x, y, adversarial=True)["similarity"] > before


def test_similarity_is_the_lambda_weighted_cosine_to_the_sources():
    model = _model(mix_samples=2)
    x, y = _batch()
    torch.manual_seed(2)
    out = model.training_losses(x, y, adversarial=True)
    with torch.no_grad():
        mixed = model.teacher_head(model.teacher_encoder(out["mixed"].inputs))
        clean = model.teacher_head(model.teacher_encoder(x))
    w, src = out["mixed"].weights, out["mixed"].sources
    cos = torch.nn.functional.cosine_similarity
    expected = (w[:, 0] * cos(mixed, clean[src[:, 0]]) + w[:, 1] * cos(mixed, clean[src[:, 1]])).mean()
    assert torch.allclose(out["similarity"], expected, atol=1e-5)


def test_lambda_margin_falls_back_to_plain_mixup_and_is_not_flipped():
    model = _model(mix_samples=3, lam_margin=0.03)
    assert not model.in_margin(torch.tensor([0.02, 0.49, 0.49]))  # first weight outside: plain mixup
    assert not model.in_margin(torch.tensor([0.98, 0.01, 0.01]))
    assert model.in_margin(torch.tensor([0.3, 0.3, 0.4]))  # inside: the generator's mask
    model = _model(mix_samples=2, lam_margin=0.499)  # practically always outside
    x, y = _batch()
    torch.manual_seed(0)
    out = model.training_losses(x, y, adversarial=False)
    mixed, w = out["student_mixed"], out["student_mixed"].weights[0]
    linear = w[0] * x[mixed.sources[:, 0]] + w[1] * x[mixed.sources[:, 1]]
    assert torch.allclose(mixed.inputs, linear, atol=1e-6)
    assert torch.allclose(out["student_masks"].sum(1), torch.ones(8, 16, 16))


class _PhaseLog(pl.Callback):
    def __init__(self):
        self.phases = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.phases.append(float(trainer.callback_metrics["train/adversarial"]))


@pytest.mark.parametrize("cls", [AdAutoMix, AutoMix])
def test_trains_with_the_ema_teacher_and_evaluates_both(cls):
    model = _model(cls, evaluate="both")
    ema, phases = _ema(), _PhaseLog()
    student_before = model.head.weight.detach().clone()
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0,
                           callbacks=[ema, phases])  # fmt: skip
    trainer.fit(model, datamodule=Digits(image_size=16, batch_size=16))
    assert ema.num_updates == 4 and trainer.global_step == 4
    assert phases.phases == ([1.0, 0.0, 1.0, 0.0] if cls is AdAutoMix else [0.0] * 4)
    assert not torch.equal(model.head.weight, student_before)
    assert not torch.equal(model.teacher_head.weight, model.head.weight)
    for key in ("val/digit/acc", "val/teacher/digit/acc", "val/student/digit/acc", "val/loss"):
        assert key in trainer.callback_metrics
    assert trainer.callback_metrics["val/digit/acc"] == trainer.callback_metrics["val/teacher/digit/acc"]


def test_separate_generator_optimizer_steps_and_is_checkpointed(tmp_path):
    model = _model(
        generator_optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        generator_lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
    )
    before = model.generator.value.weight.detach().clone()
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[_ema()])
    trainer.fit(model, datamodule=Digits(image_size=16, batch_size=16))
    assert not torch.equal(model.generator.value.weight, before)
    assert model._generator_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    trainer.save_checkpoint(tmp_path / "g.ckpt")
    saved = torch.load(tmp_path / "g.ckpt", weights_only=False)["generator_optimizer"]
    assert saved["optimizer"]["state"] and saved["scheduler"]["last_epoch"] == 2
    fake = types.SimpleNamespace(callbacks=[_ema()], precision="16-mixed")
    model._trainer = fake
    with pytest.raises(ValueError, match="separate generator_optimizer is not supported"):
        AdAutoMix.setup(model, "fit")


def test_missing_ema_callback_and_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="needs the EMATeacher callback"):
        tiny_trainer(max_steps=1).fit(_model(), datamodule=Digits(image_size=16, batch_size=16))
    with pytest.raises(ValueError, match="no submodule 'stage3'"):
        _model(feature_layer="stage3")
    with pytest.raises(ValueError, match="mix_samples must be 2 or 3"):
        _model(mix_samples=4)


class _RanksAgree(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        for prefix in ("encoder.", "head.", "teacher_encoder.", "teacher_head.", "generator."):
            flat = torch.cat([p.detach().flatten() for n, p in pl_module.named_parameters() if n.startswith(prefix)])
            gathered = pl_module.all_gather(flat)
            assert torch.equal(gathered[0], gathered[1]), f"{prefix} differs between ranks"
        assert trainer.callbacks[0].num_updates == 3


@pytest.mark.slow
def test_ddp_student_teacher_and_generator_identical_on_both_ranks():
    """One 2-process gloo run covers EMATeacher and AdAutoMix: DDP averages the student's and the
    generator's gradients, and the EMA update of identical students keeps the teachers identical."""
    model = _model()
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_steps=3, limit_val_batches=0,
                           callbacks=[_ema(), _RanksAgree()])  # fmt: skip
    trainer.fit(model, datamodule=Digits(image_size=16, batch_size=8))
