"""The Gramian level: the m x m Gramian accumulated layer by layer equals J J^T of the parameter level,
and the step it writes equals the parameter level's step, for every Gramian weighting."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.aggregators import GramianWeighting, create_aggregator, list_aggregators
from lightning_mtl.multitask.engine import flat_jacobian
from lightning_mtl.multitask.gramian import gathers_rows, layer_gramian
from tests.fixtures.trainers import tiny_trainer

GRAMIAN_METHODS = [n for n in list_aggregators() if isinstance(create_aggregator(n), GramianWeighting)]


class _Encoder(nn.Module):
    """Conv2d with R^2 > d_in * d_out (per-task weight gradients), BatchNorm (direct gradients), a Conv2d
    and a Linear with R^2 < d_in * d_out (the R x R kernel) and a Linear called twice in one forward
    (16 rows: R^2 > d_in * d_out again)."""

    out_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.norm = nn.BatchNorm2d(3)
        self.squeeze = nn.Conv2d(3, 6, 5)  # one position per sample: 8 rows
        self.fc = nn.Linear(3 * 5 * 5, 6)
        self.twice = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.conv(x)))
        h = torch.tanh(self.fc(h.flatten(1)) + self.squeeze(h).flatten(1))
        return torch.tanh(self.twice(torch.tanh(self.twice(h))))


def _seeded(name):
    cls = type(create_aggregator(name))
    return cls(seed=0) if "seed" in inspect.signature(cls).parameters else cls()


def _module(aggregator, mode, **kwargs):
    torch.manual_seed(0)
    return MultiTaskModule(
        encoder=_Encoder(),
        tasks={
            "left": ClassificationTask(10),
            "right": ClassificationTask(10),
            "sum": RegressionTask(weight=1.0),
        },
        aggregator=aggregator,
        gradient_mode=mode,
        **kwargs,
    )


def _batch(seed=1, big=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 1, 10, 10, generator=g)
    left, right = torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g)
    return x, {"left": left, "right": right, "sum": big * (left + right).float()}


def _step(name, mode, batch, scale=1.0):
    module = _module(_seeded(name), mode)
    module.train()
    torch.manual_seed(2)
    loss = module.training_step(batch, 0)
    module.backward(loss * scale if scale != 1.0 else loss)
    return module


def _grads(module):
    return [p.grad for p in module.parameters()]


def _assert_same(ours, reference, name):
    # round-off of the whole step's size: the conv bias before the BatchNorm has a gradient of zero in
    # exact arithmetic, so its own scale is round-off itself
    atol = 1e-6 * max(float(q.grad.abs().max()) for q in reference.parameters())
    for (n, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=atol, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_gramian_step_equals_parameter_step(name):
    batch = _batch()
    ours, reference = _step(name, "gramian", batch), _step(name, "parameter", batch)
    _assert_same(ours, reference, name)
    torch.testing.assert_close(ours.engine.last_gramian, reference.engine.last_gramian, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_gramian_step_equals_parameter_step_with_a_badly_scaled_task(name):
    """One task loss about 1e4 times the others (regression on labels times 100)."""
    batch = _batch(big=100.0)
    ours, reference = _step(name, "gramian", batch), _step(name, "parameter", batch)
    _assert_same(ours, reference, name)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_batched_output_gradients_give_the_same_step(chunk_size):
    """One batched backward (``jacobian_batched=True``, as on a GPU) instead of the loop."""
    batch = _batch()
    ours = _module(_seeded("upgrad"), "gramian", jacobian_batched=True, jacobian_chunk_size=chunk_size)
    reference = _module(_seeded("upgrad"), "parameter")
    for side in (ours, reference):
        side.backward(side.training_step(batch, 0))
    _assert_same(ours, reference, "upgrad")


def test_gramian_equals_the_parameter_level_jacobian_product():
    module = _module("upgrad", "gramian")
    x, y = _batch()
    reference = _module("upgrad", "parameter")
    losses, _ = reference.task_loss_terms(reference(x), y, "train")
    jac = flat_jacobian(losses, list(reference.encoder.parameters()), batched=False)
    module.backward(module.training_step((x, y), 0))
    torch.testing.assert_close(module.engine.last_gramian, jac @ jac.T, rtol=1e-5, atol=1e-7)


def test_loss_scale_is_undone():
    batch = _batch()
    plain, scaled = _step("nashmtl", "gramian", batch), _step("nashmtl", "gramian", batch, scale=1024.0)
    torch.testing.assert_close(scaled.engine.last_gramian, plain.engine.last_gramian, rtol=1e-5, atol=1e-7)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, 1024.0 * q.grad, rtol=1e-5, atol=1e-6 * float(q.grad.abs().max()) * 1024)


@pytest.mark.parametrize("rows", [3, 40])
def test_both_contractions_equal_the_gram_of_the_weight_gradients(rows):
    """R^2 < d_in * d_out (the R x R kernel) and R^2 > d_in * d_out (per-task weight gradients)."""
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(rows, 5, generator=g), torch.randn(4, rows, 7, generator=g)
    grads = torch.cat([torch.einsum("mro,rd->mod", d, x).flatten(1), d.sum(1)], dim=1)
    torch.testing.assert_close(layer_gramian(x, d, bias=True), grads @ grads.T, rtol=1e-5, atol=1e-5)


def _one_step_each_way(encoder_factory, aggregator: str, **kwargs) -> None:
    """One training step of the same two-task module in Gramian and in parameter mode; same update."""

    def module(mode):
        torch.manual_seed(0)
        return MultiTaskModule(
            encoder=encoder_factory(),
            tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
            aggregator=aggregator,
            gradient_mode=mode,
            **kwargs,
        )

    x, y = _batch()
    batch = (x, {k: y[k] for k in ("left", "right")})
    ours, reference = module("gramian"), module("parameter")
    for side in (ours, reference):
        side.backward(side.training_step(batch, 0))
    _assert_same(ours, reference, aggregator)


def test_inplace_activation_after_a_layer_keeps_the_step_exact():
    _one_step_each_way(
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(100, 6), nn.ReLU(inplace=True), nn.Linear(6, 6)),
        "mgda",
        feature_dim=6,
    )


class _PartlyFrozen(nn.Module):
    """A linear layer called once under no_grad (it adds nothing) and once with gradients."""

    out_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(100, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.fc(x.flatten(1))
        return torch.tanh(self.fc(x.flatten(1)) + frozen)


def test_a_call_under_no_grad_is_skipped():
    _one_step_each_way(_PartlyFrozen, "upgrad")


def test_non_gramian_aggregators_and_fmtl_are_refused():
    with pytest.raises(ValueError, match="gradient_mode='gramian' needs a Gramian weighting"):
        _module("graddrop", "gramian")
    from lightning_mtl.multitask.fmtl import FMTL

    with pytest.raises(ValueError, match="fmtl .* needs gradient_mode='parameter'"):
        MultiTaskModule(
            encoder=_Encoder(), tasks={"a": RegressionTask()}, aggregator="mgda", gradient_mode="gramian", fmtl=FMTL()
        )


def test_trains_under_the_trainer():
    from tests.multitask.test_engine import _SumData

    module = MultiTaskModule(
        encoder=nn.Sequential(nn.Flatten(), nn.Linear(100, 8), nn.Tanh()),
        feature_dim=8,
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10), "sum": RegressionTask()},
        aggregator="upgrad",
        gradient_mode="gramian",
    )
    tiny_trainer(fast_dev_run=2, gradient_clip_val=1.0).fit(module, datamodule=_SumData())
    assert module.engine.last_weights is not None


@pytest.mark.parametrize("rows, parameters, gathers", [(100, 80, False), (30, 80, True)])
def test_the_cross_rank_scheme_moves_fewer_numbers(rows, parameters, gathers):
    """2 ranks, m = 2: gathering sends 2 x rows numbers to each rank, averaging the gradients m x parameters."""
    assert gathers_rows(rows, parameters, m=2, world_size=2) is gathers


def test_bf16_mixed_trainer_step_matches_the_parameter_level():
    """Under autocast the layers' outputs, and so the pieces of the Gramian, are bfloat16: one Trainer
    step in each mode gives the same update to bfloat16 round-off. (On a CPU Lightning runs 16-mixed as
    bf16-mixed; GradScaler's scale on a GPU is undone as in ``test_loss_scale_is_undone``.)"""
    from tests.multitask.test_engine import _SumData

    updates = []
    for mode in ("gramian", "parameter"):
        torch.manual_seed(0)
        module = MultiTaskModule(
            encoder=nn.Sequential(nn.Flatten(), nn.Linear(100, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh()),
            feature_dim=8,
            tasks={"left": ClassificationTask(10), "right": ClassificationTask(10), "sum": RegressionTask()},
            aggregator="upgrad",
            gradient_mode=mode,
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        )
        before = [p.detach().clone() for p in module.parameters()]
        trainer = tiny_trainer(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, precision="bf16-mixed")
        trainer.fit(module, datamodule=_SumData())
        updates.append([p.detach() - b for p, b in zip(module.parameters(), before)])
    ours, reference = updates
    size = max(float(u.abs().max()) for u in reference)
    assert size > 0, "the step was skipped"
    for u, v in zip(ours, reference):
        torch.testing.assert_close(u, v, rtol=1e-2, atol=2e-3 * size)  # seen: 2e-4 * size


def test_a_requested_jacobian_is_the_parameter_levels():
    batch = _batch()
    sides = []
    for mode in ("gramian", "parameter"):
        module = _module(_seeded("mgda"), mode)
        module.engine.request_jacobian("parameter")
        module.backward(module.training_step(batch, 0))
        sides.append(module)
    ours, reference = sides
    torch.testing.assert_close(ours.engine.last_jacobian, reference.engine.last_jacobian, rtol=1e-5, atol=1e-7)
    _assert_same(ours, reference, "mgda")
