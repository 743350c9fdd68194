"""``gradient_mode="auto"``: the documented rule (m, the encoder's layers, the device) and its use by
the module, which then runs exactly the chosen level."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_mtl import ClassificationTask, DigitsCNN, MultiTaskModule
from lightning_mtl.multitask.auto_mode import AUTO_LINEAR_SHARE, AUTO_MIN_TASKS, choose_gradient_mode
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
    "encoder, m, gramian_weighting, device, expected",
    [
        (_mlp(), AUTO_MIN_TASKS, True, "cpu", "gramian"),
        (_mlp(), 40, True, torch.device("cpu"), "gramian"),
        (_FrozenStem(), AUTO_MIN_TASKS, True, "cpu", "gramian"),
        (_mlp(), AUTO_MIN_TASKS - 1, True, "cpu", "parameter"),  # too few tasks
        (_mlp(), AUTO_MIN_TASKS, False, "cpu", "parameter"),  # not a Gramian weighting, or F-MTL
        (_mlp(), AUTO_MIN_TASKS, True, "cuda", "parameter"),  # no GPU measurement
        (DigitsCNN(), AUTO_MIN_TASKS, True, "cpu", "parameter"),  # trainable convolutions
        (_linear_share_below_the_limit(), AUTO_MIN_TASKS, True, "cpu", "parameter"),
    ],
)
def test_the_rule(encoder, m, gramian_weighting, device, expected):
    assert choose_gradient_mode(encoder, m, gramian_weighting, device) == expected


def test_the_documented_thresholds():
    assert (AUTO_MIN_TASKS, AUTO_LINEAR_SHARE) == (10, 0.9)


def _module(mode, m, aggregator="upgrad", encoder=_mlp, **kwargs):
    torch.manual_seed(0)
    tasks = {f"t{i}": ClassificationTask(10) for i in range(m)}
    return MultiTaskModule(encoder=encoder(), feature_dim=32, tasks=tasks, aggregator=aggregator,
                           gradient_mode=mode, **kwargs)  # fmt: skip


def _batch(m):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 10, 10, generator=g), {f"t{i}": torch.randint(0, 10, (8,), generator=g) for i in range(m)}


@pytest.mark.parametrize("m, chosen", [(AUTO_MIN_TASKS, "gramian"), (2, "parameter")])
def test_the_module_runs_exactly_the_chosen_level(m, chosen):
    batch = _batch(m)
    auto, explicit = _module("auto", m), _module(chosen, m)
    assert auto.engine.mode == chosen and auto.hparams.gradient_mode == "auto"
    for module in (auto, explicit):
        module.backward(module.training_step(batch, 0))
    for (name, p), q in zip(auto.named_parameters(), explicit.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_methods_without_a_gramian_level_run_at_the_parameter_level():
    from lightning_mtl.multitask.fmtl import FMTL

    assert _module("auto", AUTO_MIN_TASKS, aggregator="graddrop").engine.mode == "parameter"
    assert _module("auto", AUTO_MIN_TASKS, fmtl=FMTL()).engine.mode == "parameter"
    assert _module("auto", AUTO_MIN_TASKS, encoder=DigitsCNN).engine.mode == "parameter"


def test_the_fit_applies_the_rule_on_its_device(monkeypatch):
    """The choice is made again when the fit starts, for the device the module trains on."""
    from lightning_mtl.multitask import auto_mode
    from lightning_mtl.multitask import module as module_file

    seen = []

    def recording(encoder, m, gramian_weighting, device):
        seen.append((m, gramian_weighting, torch.device(device).type))
        return auto_mode.choose_gradient_mode(encoder, m, gramian_weighting, device)

    monkeypatch.setattr(module_file, "choose_gradient_mode", recording)
    module = _module("auto", AUTO_MIN_TASKS)
    module.engine.mode = "parameter"  # what the construction chose is replaced at fit start
    x, y = _batch(AUTO_MIN_TASKS)
    data = torch.utils.data.DataLoader([(x, y)], batch_size=None)
    tiny_trainer(max_steps=1, limit_val_batches=0).fit(module, data)
    assert seen[-1] == (AUTO_MIN_TASKS, True, "cpu")
    assert module.engine.mode == "gramian" and module.engine.last_gramian is not None
