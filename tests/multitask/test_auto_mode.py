"""``gradient_mode="auto"``: the documented rule (m, the encoder's layers, the device) and its use by
the module, which then runs exactly the chosen level."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl import ClassificationTask, DigitsCNN, MultiTaskModule
from lightning_mtl.multitask.auto_mode import AUTO_LINEAR_SHARE, AUTO_MAX_ROWS, AUTO_MIN_TASKS, choose_gradient_mode
from tests.fixtures.trainers import tiny_trainer


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())


class _FrozenStem(nn.Module):
    """A frozen convolution in front of linear layers: no trainable convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3).requires_grad_(False)
        self.fc = nn.Linear(2 * 8 * 8, 32)

    def forward(self, x):
        return torch.relu(self.fc(self.stem(x).flatten(1)))


def _linear_share_below_the_limit():
    """An embedding table bigger than the linear layer: under 90 % of the parameters are linear."""
    encoder = nn.Sequential(nn.Linear(10, 10), nn.Embedding(20, 10))
    linear = 10 * 10 + 10
    assert linear < AUTO_LINEAR_SHARE * (linear + 200)
    return encoder


@pytest.mark.parametrize(
    "encoder, m, gramian_weighting, device, rows, expected",
    [
        (_mlp(), AUTO_MIN_TASKS, True, "cpu", AUTO_MAX_ROWS, "gramian"),
        (_mlp(), 40, True, torch.device("cpu"), 1, "gramian"),
        (_FrozenStem(), AUTO_MIN_TASKS, True, "cpu", 32, "gramian"),
        (_mlp(), AUTO_MIN_TASKS - 1, True, "cpu", 32, "parameter"),  # too few tasks
        (_mlp(), 40, True, "cpu", AUTO_MAX_ROWS + 1, "parameter"),  # too many rows
        (_mlp(), AUTO_MIN_TASKS, False, "cpu", 32, "parameter"),  # not a Gramian weighting, or F-MTL
        (_mlp(), AUTO_MIN_TASKS, True, "cuda", 32, "parameter"),  # no GPU measurement
        (DigitsCNN(), AUTO_MIN_TASKS, True, "cpu", 32, "parameter"),  # trainable convolutions
        (_linear_share_below_the_limit(), AUTO_MIN_TASKS, True, "cpu", 32, "parameter"),
    ],
)
def test_the_rule(encoder, m, gramian_weighting, device, rows, expected):
    assert choose_gradient_mode(encoder, m, gramian_weighting, device, rows) == expected


def test_the_documented_thresholds():
    assert (AUTO_MIN_TASKS, AUTO_MAX_ROWS, AUTO_LINEAR_SHARE) == (4, 64, 0.9)


def _module(mode, m, aggregator="upgrad", encoder=_mlp, **kwargs):
    torch.manual_seed(0)
    tasks = {f"t{i}": ClassificationTask(10) for i in range(m)}
    return MultiTaskModule(encoder=encoder(), feature_dim=32 if encoder is _mlp else None, tasks=tasks, aggregator=aggregator,
                           gradient_mode=mode, **kwargs)  # fmt: skip


def _batch(m):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 10, 10, generator=g), {f"t{i}": torch.randint(0, 10, (8,), generator=g) for i in range(m)}


@pytest.mark.parametrize("m, chosen", [(AUTO_MIN_TASKS, "gramian"), (2, "parameter")])
def test_the_module_runs_exactly_the_chosen_level(m, chosen):
    batch = _batch(m)
    auto, explicit = _module("auto", m), _module(chosen, m)
    for module in (auto, explicit):
        module.backward(module.training_step(batch, 0))
    assert auto.engine.mode == chosen and auto.hparams.gradient_mode == "auto"
    for (name, p), q in zip(auto.named_parameters(), explicit.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_methods_without_a_gramian_level_run_at_the_parameter_level():
    from lightning_mtl.multitask.fmtl import FMTL

    batch = _batch(AUTO_MIN_TASKS)
    for kwargs in ({"aggregator": "graddrop"}, {"fmtl": FMTL()}, {"encoder": DigitsCNN}):
        module = _module("auto", AUTO_MIN_TASKS, **kwargs)
        module.backward(module.training_step(batch, 0))
        assert module.engine.mode == "parameter", kwargs


def test_each_fit_chooses_once_on_its_first_batch_and_device(monkeypatch):
    """A fit's first batch and device decide; its smaller last batch does not switch the level, and the
    next fit chooses again."""
    from lightning_mtl.multitask import auto_mode
    from lightning_mtl.multitask import module as module_file

    seen = []

    def recording(encoder, m, gramian_weighting, device, rows):
        seen.append((m, gramian_weighting, torch.device(device).type, rows))
        return auto_mode.choose_gradient_mode(encoder, m, gramian_weighting, device, rows)

    monkeypatch.setattr(module_file, "choose_gradient_mode", recording)
    module = _module("auto", AUTO_MIN_TASKS)
    x, y = _batch(AUTO_MIN_TASKS)
    data = torch.utils.data.DataLoader([(x, y), (x[:3], {k: v[:3] for k, v in y.items()})], batch_size=None)
    for _ in range(2):
        tiny_trainer(max_steps=2, limit_val_batches=0).fit(module, data)
    assert seen == [(AUTO_MIN_TASKS, True, "cpu", 8)] * 2
    assert module.engine.mode == "gramian" and module.engine.last_gramian is not None
