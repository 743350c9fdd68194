"""The SharpnessAwareMinimization callback on an unchanged LightningModule against a hand-written SAM loop."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torchmetrics import MeanMetric

from lightning_mtl.sharpness import SAM, RhoSchedule, SharpnessAwareMinimization
from tests.sharpness._common import Classifier, batches, hand_sam_step, loader, tiny_net, trainer


def _reference(net, data, rho, adaptive=False, eta=0.01, lr=0.1, momentum=0.9, **kwargs):
    net = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    losses = [float(hand_sam_step(net, optimizer, x, y, rho, adaptive, eta, **kwargs)) for x, y in data]
    return net, losses


def _assert_same(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol), name
    for (name, p), q in zip(a.named_buffers(), b.buffers()):
        assert torch.allclose(p.float(), q.float(), atol=atol), name


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_callback_equals_hand_written_sam_and_has_one_pass_side_effects(adaptive, rho):
    data = batches(3)
    net = tiny_net()
    reference, ref_losses = _reference(net, data, rho, adaptive)
    module = Classifier(copy.deepcopy(net))
    sam = SharpnessAwareMinimization(rho=rho, adaptive=adaptive)
    trainer(callbacks=[sam]).fit(module, loader(data))
    _assert_same(module.net, reference)  # parameters and BatchNorm statistics
    assert sam.steps == 3
    # one pass of side effects: logs (the loss at w), backward hooks, clipping hook; training_step runs twice
    assert module.calls == {"training_step": 6, "log": 3, "on_after_backward": 3, "clip": 3, "before_opt": 3}
    assert module.logged_losses == pytest.approx(ref_losses, abs=1e-6)
    bn = module.net[1]
    assert int(bn.num_batches_tracked) == 3


def test_batchnorm_statistics_move_once_per_step():
    x, y = batches(1)[0]
    net = tiny_net()
    module = Classifier(copy.deepcopy(net), lr=0.0)
    trainer(callbacks=[SharpnessAwareMinimization(rho=0.5)]).fit(module, loader([(x, y)]))
    one_forward = copy.deepcopy(net).train()
    one_forward(x)
    assert int(module.net[1].num_batches_tracked) == 1
    assert torch.allclose(module.net[1].running_mean, one_forward[1].running_mean, atol=1e-7)
    assert torch.allclose(module.net[1].running_var, one_forward[1].running_var, atol=1e-7)


class _WithMetric(Classifier):
    def __init__(self, net):
        super().__init__(net)
        self.mean_loss = MeanMetric()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.mean_loss.update(loss.detach())
        self.perturbed_calls = getattr(self, "perturbed_calls", 0) + SharpnessAwareMinimization.in_perturbed_pass(self)
        return loss


def test_torchmetrics_state_updated_from_one_pass_only():
    data = batches(2)
    module = _WithMetric(tiny_net())
    trainer(callbacks=[SharpnessAwareMinimization(rho=0.05)]).fit(module, loader(data))
    assert module.mean_loss._update_count == 2
    assert module.perturbed_calls == 2 and module.calls["training_step"] == 4
    assert float(module.mean_loss.compute()) == pytest.approx(sum(module.logged_losses) / 2, abs=1e-6)


def test_gradient_clipping_once_after_the_second_pass():
    data = batches(2)
    net = tiny_net()
    reference, _ = _reference(net, data, rho=0.05, clip_norm=0.05)
    module = Classifier(copy.deepcopy(net))
    trainer(callbacks=[SharpnessAwareMinimization(rho=0.05)], gradient_clip_val=0.05).fit(module, loader(data))
    _assert_same(module.net, reference)
    assert module.calls["clip"] == 2


def test_lr_scheduler_and_rho_schedule():
    data = batches(3)
    net = tiny_net()
    schedule = RhoSchedule(start=0.02, end=0.2, steps=2, kind="cosine")
    reference = copy.deepcopy(net)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    lr_sched = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    for step, (x, y) in enumerate(data):
        hand_sam_step(reference, optimizer, x, y, rho=schedule(step))
        lr_sched.step()
    module = Classifier(copy.deepcopy(net), scheduler=True)
    sam = SharpnessAwareMinimization(rho=schedule)
    trainer(callbacks=[sam]).fit(module, loader(data))
    _assert_same(module.net, reference)
    assert sam.last_rho == pytest.approx(0.2)


def test_wrapper_in_configure_optimizers_with_the_callback():
    data = batches(2)
    net = tiny_net()
    reference, _ = _reference(net, data, rho=0.7, adaptive=True, eta=0.05)

    class WithSAM(Classifier):
        def configure_optimizers(self):
            return SAM(self.parameters(), functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                       rho=0.7, adaptive=True, eta=0.05)  # fmt: skip

    module = WithSAM(copy.deepcopy(net))
    sam = SharpnessAwareMinimization()  # rho, adaptive and eta come from the wrapper
    trainer(callbacks=[sam]).fit(module, loader(data))
    _assert_same(module.net, reference)
    assert sam.adaptive and sam.last_rho == 0.7 and module.trainer.optimizers[0].sam_steps == 2


def test_resume_equals_uninterrupted_run(tmp_path):
    data = batches(4)
    net = tiny_net()
    schedule = RhoSchedule(start=0.05, end=0.5, steps=4, kind="linear")
    whole = Classifier(copy.deepcopy(net))
    trainer(callbacks=[SharpnessAwareMinimization(rho=schedule)], max_epochs=2).fit(whole, loader(data))

    first = Classifier(copy.deepcopy(net))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(callbacks=[SharpnessAwareMinimization(rho=schedule), ckpt], max_epochs=1,
            enable_checkpointing=True).fit(first, loader(data))  # fmt: skip
    resumed = Classifier(tiny_net(seed=123))
    sam = SharpnessAwareMinimization(rho=schedule)
    trainer(callbacks=[sam], max_epochs=2).fit(resumed, loader(data), ckpt_path=str(tmp_path / "last.ckpt"))
    assert sam.steps == 8
    _assert_same(resumed.net, whole.net, atol=0)


def test_bf16_mixed_equals_hand_written_step_under_autocast():
    data = batches(2)
    net = tiny_net(batchnorm=False)
    reference, _ = _reference(net, data, rho=0.05, autocast=torch.bfloat16)
    module = Classifier(copy.deepcopy(net))
    trainer(callbacks=[SharpnessAwareMinimization(rho=0.05)], precision="bf16-mixed").fit(module, loader(data))
    _assert_same(module.net, reference, atol=1e-5)


def _fp16_trainer(scaler, **kwargs):
    return trainer(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kwargs)


def test_16_mixed_unscales_both_passes():
    """A real GradScaler on the CPU: the update equals the hand-written step with both passes unscaled."""
    data = batches(2)
    net = tiny_net(batchnorm=False)
    reference, _ = _reference(net, data, rho=0.05, autocast=torch.float16)
    module = Classifier(copy.deepcopy(net))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _fp16_trainer(scaler, callbacks=[SharpnessAwareMinimization(rho=0.05)]).fit(module, loader(data))
    _assert_same(module.net, reference, atol=1e-4)
    assert scaler.get_scale() == 2.0**10  # no step was skipped


class _Overflow(Classifier):
    """Makes the loss infinite in one of the two passes of the first step."""

    def __init__(self, net, bad_call):
        super().__init__(net, momentum=0.0)
        self.bad_call = bad_call

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.calls["training_step"] == self.bad_call:
            loss = loss * float("inf")
        return loss


@pytest.mark.parametrize("bad_call", [1, 2], ids=["first_pass", "perturbed_pass"])
def test_16_mixed_skips_a_non_finite_step(bad_call):
    net = tiny_net(batchnorm=False)
    module = _Overflow(copy.deepcopy(net), bad_call)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _fp16_trainer(scaler, callbacks=[SharpnessAwareMinimization(rho=0.05)]).fit(module, loader(batches(1)))
    _assert_same(module.net, net, atol=0)  # untouched, bit for bit
    assert scaler.get_scale() == 2.0**9  # the scaler saw the overflow and backed off


def test_gradient_accumulation_equals_sam_on_the_concatenated_batch():
    micro = batches(4, size=8)
    whole = [(torch.cat([micro[i][0], micro[i + 1][0]]), torch.cat([micro[i][1], micro[i + 1][1]])) for i in (0, 2)]
    net = tiny_net(batchnorm=False)
    reference, _ = _reference(net, whole, rho=0.2)
    module = Classifier(copy.deepcopy(net))
    sam = SharpnessAwareMinimization(rho=0.2)
    trainer(callbacks=[sam], accumulate_grad_batches=2).fit(module, loader(micro))
    _assert_same(module.net, reference)
    assert sam.steps == 2 and module.calls["training_step"] == 8 and module.calls["log"] == 4


def test_unsupported_flags_are_refused_at_setup():

    class Manual(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

    with pytest.raises(ValueError, match="automatic optimization"):
        trainer(callbacks=[SharpnessAwareMinimization()]).fit(Manual(tiny_net()), loader(batches(1)))
    with pytest.raises(ValueError, match="rho"):
        SharpnessAwareMinimization(rho=-1.0)


def test_gradient_aggregators_under_ddp_are_refused_at_setup():
    """Checked without spawning processes: a Trainer that reports two ranks and a MultiTaskModule."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from tests.fixtures.trainers import tiny_module

    fake = SimpleNamespace(world_size=2, strategy=DDPStrategy(), accumulate_grad_batches=1)
    with pytest.raises(ValueError, match="F-MTL"):
        SharpnessAwareMinimization().setup(fake, tiny_module(aggregator="pcgrad"), "fit")
    SharpnessAwareMinimization().setup(fake, tiny_module(aggregator="ls"), "fit")  # a loss weighting is fine
