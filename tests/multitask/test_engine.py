"""The per-task gradient engine: Jacobians against single backward passes, and the gradients that a
training step writes against a hand-written aggregation on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.aggregators import GramianWeighting, create_aggregator, list_aggregators
from lightning_mtl.multitask.engine import flat_jacobian
from tests.fixtures.trainers import tiny_multidigits, tiny_trainer

GRADIENT_METHODS = [n for n in list_aggregators() if create_aggregator(n).kind != "loss"]
LOSS_WEIGHTINGS = [n for n in list_aggregators() if create_aggregator(n).kind == "loss" and n != "ls"]
GRAMIAN_METHODS = [n for n in GRADIENT_METHODS if isinstance(create_aggregator(n), GramianWeighting)]


def _problem(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
    x = torch.randn(9, 6)
    heads = [nn.Linear(4, 1) for _ in range(3)]
    z = encoder(x)
    losses = torch.stack([(h(z).squeeze(1) - k).pow(2).mean() for k, h in enumerate(heads)])
    return encoder, losses


@pytest.mark.parametrize("batched", [True, False])
def test_jacobian_equals_single_backward_passes(batched):
    encoder, losses = _problem()
    params = list(encoder.parameters())
    jac = flat_jacobian(losses, params, batched=batched, chunk_size=2)
    for i in range(3):
        encoder.zero_grad()
        losses[i].backward(retain_graph=True)
        row = torch.cat([p.grad.flatten() for p in params])
        assert torch.allclose(jac[i], row, atol=1e-6)


def _seeded(name):
    """The aggregator with a fixed seed where it draws random numbers, so two copies agree."""
    import inspect

    cls = type(create_aggregator(name))
    return cls(seed=0) if "seed" in inspect.signature(cls).parameters else cls()


def _module(aggregator, **kwargs):
    torch.manual_seed(0)
    return MultiTaskModule(
        encoder=nn.Sequential(nn.Flatten(), nn.Linear(100, 8), nn.Tanh()),
        feature_dim=8,
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10), "sum": RegressionTask()},
        aggregator=aggregator,
        **kwargs,
    )


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 1, 10, 10, generator=g)
    left, right = torch.randint(0, 10, (12,), generator=g), torch.randint(0, 10, (12,), generator=g)
    return x, {"left": left, "right": right, "sum": (left + right).float()}


def _hand_losses(module, x, y):
    z = module.encoder(x)
    return z, torch.stack([
        F.cross_entropy(module.heads["left"](z), y["left"]),
        F.cross_entropy(module.heads["right"](z), y["right"]),
        F.mse_loss(module.heads["sum"](z).squeeze(1), y["sum"]),
    ])  # fmt: skip


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_parameter_level_step_writes_aggregated_gradient(name):
    module, reference = _module(_seeded(name)), _module(_seeded(name))
    x, y = _batch()
    module.backward(module.training_step((x, y), 0))

    _, losses = _hand_losses(reference, x, y)
    if getattr(reference.aggregator, "uses_log_losses", False):
        losses = losses.log()
    shared = list(reference.encoder.parameters())
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], shared, retain_graph=True)]) for i in range(3)
    ]
    expected = reference.aggregator.aggregate(torch.stack(rows))
    written = torch.cat([p.grad.flatten() for p in module.encoder.parameters()])
    assert torch.allclose(written, expected, atol=1e-5, rtol=1e-4), name
    # each head gets its own task's ordinary gradient (of the log-loss for methods on log-losses)
    _, losses = _hand_losses(reference, x, y)
    if getattr(reference.aggregator, "uses_log_losses", False):
        losses = losses.log()
    head_grad = torch.autograd.grad(losses[0], reference.heads["left"].weight)[0]
    assert torch.allclose(module.heads["left"].weight.grad, head_grad, atol=1e-6)


@pytest.mark.parametrize("name", ["mgda", "nashmtl", "imtl_g"])
def test_representation_level_step_is_weighted_backward(name):
    module, reference = _module(name, gradient_mode="representation"), _module(name, gradient_mode="representation")
    x, y = _batch()
    module.backward(module.training_step((x, y), 0))

    z, losses = _hand_losses(reference, x, y)
    rows = torch.stack([torch.autograd.grad(losses[i], z, retain_graph=True)[0].flatten() for i in range(3)])
    weights = reference.aggregator(rows @ rows.T)
    (weights.detach() * losses).sum().backward()
    for p, q in zip(module.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4)


def test_representation_mode_needs_a_gramian_weighting():
    with pytest.raises(ValueError, match="gradient_mode='parameter'"):
        _module("graddrop", gradient_mode="representation")


def test_gradient_accumulation_is_refused_at_setup():
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported with MGDA"):
        tiny_trainer(accumulate_grad_batches=2, fast_dev_run=True).fit(_module("mgda"), datamodule=_SumData())


class _SumData(tiny_multidigits().__class__):
    """MultiDigits with a third task, the sum of the two digits (a regression target)."""

    def __init__(self, **kwargs):
        super().__init__(num_train=128, num_val=32, num_test=32, batch_size=16, **kwargs)

    @property
    def task_names(self):
        return ("left", "right", "sum")

    def _build(self):
        super()._build()
        for split in (self.train_set, self.val_set, self.test_set):
            split.targets["sum"] = (split.targets["left"] + split.targets["right"]).float()


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_every_gradient_method_trains_under_the_trainer_with_clipping(name):
    module = _module(name)
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, gradient_clip_val=0.5)
    trainer.fit(module, datamodule=_SumData())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if name in GRAMIAN_METHODS:
        assert "train/weight/left" in trainer.callback_metrics


def test_bf16_mixed_gives_the_fp32_step_approximately():
    x, y = _batch()
    results = []
    for precision in ("32-true", "bf16-mixed"):
        module = _module("nashmtl", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        trainer = tiny_trainer(max_steps=1, limit_val_batches=0, precision=precision)
        loader = torch.utils.data.DataLoader([(x, y)], batch_size=None)
        start = [p.detach().clone() for p in module.encoder.parameters()]
        trainer.fit(module, train_dataloaders=loader)
        results.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(module.encoder.parameters(), start)]))
    assert (results[0] - results[1]).norm() < 0.03 * results[0].norm()


@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_loss_scale_is_undone_for_the_aggregator(mode):
    """16-mixed hands backward() the closure loss times GradScaler's scale; the gradients written must
    be that scale times the unscaled step, also for a method whose weights are not scale-free."""
    x, y = _batch()
    grads = []
    for scale in (1.0, 1024.0):
        module = _module("nashmtl", gradient_mode=mode)
        module.backward(module.training_step((x, y), 0) * scale)
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    assert torch.allclose(grads[1], 1024.0 * grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_every_loss_weighting_trains_and_logs_its_weights(name):
    module = _module(name)
    trainer = tiny_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, datamodule=_SumData())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert {"train/weight/left", "train/weight/right", "train/weight/sum"} <= set(trainer.callback_metrics)
    if name == "gradnorm":  # renormalized after every step
        assert module.aggregator.loss_weights.sum().item() == pytest.approx(3.0, rel=1e-5)


def test_last_shared_layer_is_the_encoders_last_parametrized_module():
    module = _module("gradnorm")
    assert module.last_shared_parameters() == list(module.encoder[1].parameters())
