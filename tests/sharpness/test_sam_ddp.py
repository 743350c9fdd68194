"""Two CPU processes (gloo): the documented DDP semantics of the SAM callback, computed by hand.

Each rank perturbs with its own, unsynchronized gradient (m-sharpness, m = the per-rank batch), the
gradients at the per-rank perturbed points are averaged, and every rank takes the same step."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_mtl.sharpness import SharpnessAwareMinimization
from tests.fixtures.ddp import SpawnDDP
from tests.sharpness._common import Classifier, batches, hand_perturbation, loader, tiny_net, trainer


class _RanksAgree(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "parameters differ between ranks"


class _SaveBatches(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch, self.folder / f"batch_rank{trainer.global_rank}_step{batch_idx}.pt")


def _grad(net, x, y):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    return [p.grad.clone() for p in net.parameters()]


def _step_by_hand(net, optimizer, parts, rho, per_rank):
    """per_rank=True: the documented m-sharpness; False: one perturbation from the averaged gradient."""
    params = list(net.parameters())
    saved = [p.detach().clone() for p in params]
    grads = [_grad(net, x, y) for x, y in parts]
    mean = [sum(gs) / len(gs) for gs in zip(*grads)]
    at_perturbed = []
    for (x, y), g in zip(parts, grads):
        e = hand_perturbation(params, g if per_rank else mean, rho, False, 0.0)
        with torch.no_grad():
            for p, d in zip(params, e):
                p.add_(d)
        at_perturbed.append(_grad(net, x, y))
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    for p, gs in zip(params, zip(*at_perturbed)):
        p.grad = sum(gs) / len(gs)  # DDP's average over the two ranks
    optimizer.step()


@pytest.mark.slow
def test_ddp_sam_equals_per_rank_perturbation_by_hand(tmp_path):
    rho, steps = 0.3, 2
    net = tiny_net(batchnorm=False)
    module = Classifier(copy.deepcopy(net), lr=0.5)
    trainer(strategy=SpawnDDP(), devices=2, limit_train_batches=steps,
            callbacks=[SharpnessAwareMinimization(rho=rho), _RanksAgree(), _SaveBatches(tmp_path)],
            ).fit(module, loader(batches(2 * steps)))  # fmt: skip

    results = {}
    for per_rank in (True, False):
        reference = copy.deepcopy(net)
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
        for step in range(steps):
            parts = [torch.load(tmp_path / f"batch_rank{r}_step{step}.pt") for r in (0, 1)]
            assert not torch.equal(parts[0][0], parts[1][0]), "both ranks saw the same samples"
            _step_by_hand(reference, optimizer, parts, rho, per_rank)
        results[per_rank] = reference
    for p, q in zip(module.parameters(), results[True].parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # and the test can tell: a synchronized first pass would have given a different update
    assert any(not torch.allclose(p, q, atol=1e-4) for p, q in zip(module.parameters(), results[False].parameters()))
