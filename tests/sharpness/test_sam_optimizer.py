"""The SAM / ASAM optimizer wrapper in plain PyTorch against the hand-written two-pass step."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.sharpness import SAM, RhoSchedule
from tests.sharpness._common import Classifier, batches, hand_sam_step, loader, tiny_net, trainer


def _run_wrapper(net, data, **sam_kwargs):
    optimizer = SAM(net.parameters(), functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), **sam_kwargs)
    for x, y in data:
        calls, after_first = [], []

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            calls.append(1)
            if len(calls) == 1:  # BatchNorm is the user's business in plain PyTorch: keep the first pass's
                after_first[:] = [b.detach().clone() for b in net.buffers()]
            return loss

        optimizer.step(closure)
        assert len(calls) == 2
        with torch.no_grad():
            for b, s in zip(net.buffers(), after_first):
                b.copy_(s)
    return optimizer


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_wrapper_equals_hand_written_step(adaptive, rho):
    data = batches(3)
    net = tiny_net()
    reference = copy.deepcopy(net)
    _run_wrapper(net, data, rho=rho, adaptive=adaptive, eta=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        hand_sam_step(reference, ref_opt, x, y, rho, adaptive, eta=0.01)
    for p, q in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    plain = tiny_net()  # and SAM is not plain SGD
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    assert not torch.allclose(next(plain.parameters()), next(net.parameters()), atol=1e-4)


def test_first_and_second_step_api_and_rho_schedule():
    x, y = batches(1)[0]
    net, reference = tiny_net(batchnorm=False), tiny_net(batchnorm=False)
    schedule = RhoSchedule(start=0.1, end=0.3, steps=2, kind="linear")
    optimizer = SAM(net.parameters(), functools.partial(torch.optim.SGD, lr=0.2), rho=schedule)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.2)
    for step in range(3):
        F.cross_entropy(net(x), y).backward()
        optimizer.first_step(zero_grad=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.second_step(zero_grad=True)
        hand_sam_step(reference, ref_opt, x, y, rho=schedule(step))
    assert optimizer.sam_steps == 3
    for p, q in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_scheduler_acts_on_base_optimizer_and_state_dict_round_trip():
    net = tiny_net(batchnorm=False)
    optimizer = SAM(net.parameters(), functools.partial(torch.optim.SGD, lr=0.4, momentum=0.9), rho=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = batches(1)[0]

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    state = copy.deepcopy(optimizer.state_dict())
    assert state["sam_steps"] == 1 and len(state["state"]) == len(list(net.parameters()))  # momentum buffers

    other = SAM(net.parameters(), functools.partial(torch.optim.SGD, lr=0.4, momentum=0.9), rho=0.05)
    other.load_state_dict(state)
    assert other.sam_steps == 1 and other.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert other.param_groups is other.base_optimizer.param_groups
    buf = other.base_optimizer.state[next(net.parameters())]["momentum_buffer"]
    assert torch.equal(buf, optimizer.base_optimizer.state[next(net.parameters())]["momentum_buffer"])


def test_wrapper_without_closure_or_under_lightning_without_the_callback_raises():
    net = tiny_net(batchnorm=False)
    optimizer = SAM(net.parameters(), torch.optim.SGD, rho=0.05)
    with pytest.raises(RuntimeError, match="SharpnessAwareMinimization"):
        optimizer.step()

    class WithSAM(Classifier):
        def configure_optimizers(self):
            return SAM(self.parameters(), functools.partial(torch.optim.SGD, lr=0.1))

    with pytest.raises(RuntimeError, match="SharpnessAwareMinimization"):
        trainer(max_steps=1).fit(WithSAM(tiny_net()), loader(batches(1)))


def test_bad_arguments():
    net = tiny_net(batchnorm=False)
    with pytest.raises(ValueError, match="rho"):
        SAM(net.parameters(), torch.optim.SGD, rho=-0.1)
    with pytest.raises(ValueError, match="eta"):
        SAM(net.parameters(), torch.optim.SGD, eta=-1.0)
    with pytest.raises(TypeError, match="nest"):
        SAM(net.parameters(), lambda p: SAM(p, torch.optim.SGD))


class _Manual(Classifier):
    """Lightning manual optimization: the user steps the wrapper with a closure."""

    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        optimizer.step(closure=closure)

    def configure_optimizers(self):
        return SAM(self.parameters(), functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), rho=0.1)


def test_wrapper_under_lightning_manual_optimization():
    data = batches(2)
    net = tiny_net(batchnorm=False)
    module = _Manual(copy.deepcopy(net))
    trainer().fit(module, loader(data))
    reference = copy.deepcopy(net)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        hand_sam_step(reference, optimizer, x, y, rho=0.1)
    for p, q in zip(module.net.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
