"""OnlineLinearProbe: detached features (no gradient reaches the module), it learns, its state is checkpointed."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.callbacks.linear_probe import OnlineLinearProbe
from lightning_mtl.ssl import BarlowTwins
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.ssl_toys import CountingModule, FixedFeatureModule, ToyData, UnlabelledTrainData
from tests.fixtures.trainers import tiny_trainer


class _NoTrainer:
    """What on_train_batch_end needs of a trainer outside fit: nothing (logging is skipped without one)."""


@pytest.mark.parametrize("return_features", [True, False])
def test_probe_update_never_reaches_the_module(return_features):
    """The module hands over features that still require grad (or none, and the probe computes them):
    the probe's update leaves every module gradient untouched and BatchNorm statistics unchanged."""
    torch.manual_seed(0)
    module = BarlowTwins(DigitsCNN(1, (4, 8), out_features=16), embedding_dim=8, projector_hidden=(8,))
    probe = OnlineLinearProbe(num_classes=10, feature_dim=16)
    probe.setup(None, module, "fit")
    x = torch.randn(12, 1, 8, 8)
    y = torch.randint(0, 10, (12,))
    features = module.backbone(x)  # attached to the graph on purpose
    outputs = {"loss": features.sum(), "features": features} if return_features else {"loss": features.sum()}
    bn_stats = {k: v.clone() for k, v in module.state_dict().items() if "running" in k}
    touched = []
    for parameter in module.parameters():
        parameter.register_hook(lambda g: touched.append(g))
    head_before = probe.head.weight.detach().clone()
    module.train()
    probe.on_train_batch_end(_NoTrainer(), module, outputs, ((x, x), y), 0)
    assert not touched, "a gradient reached the module"
    assert all(p.grad is None for p in module.parameters())
    assert not torch.equal(probe.head.weight, head_before)  # the probe itself did learn
    for key, value in module.state_dict().items():
        if key in bn_stats:
            assert torch.equal(value, bn_stats[key]), key
    assert module.training and all(m.training for m in module.modules())  # modes restored


def test_probe_learns_separable_features_and_is_checkpointed(tmp_path):
    data = ToyData(n_train=192, n_val=96, batch_size=16, unlabelled_every=7)
    module = FixedFeatureModule(feature_dim=8)
    module.backbone.weight.data = torch.eye(8)  # identity features: the clusters stay separable
    module.backbone.bias.data.zero_()
    probe = OnlineLinearProbe(num_classes=4, lr=0.05)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/probe/acc", mode="max")
    trainer = tiny_trainer(max_epochs=5, enable_checkpointing=True, callbacks=[probe, checkpoint])
    trainer.fit(module, datamodule=data)
    # scikit-learn's logistic regression on the same labelled samples reaches 0.72; chance is 0.25
    assert float(trainer.callback_metrics["val/probe/acc"]) > 0.6
    assert module.metric_directions["val/probe/acc"] is True
    best_head = torch.load(checkpoint.best_model_path, weights_only=False)["callbacks"]
    state = next(v for k, v in best_head.items() if k.startswith("OnlineLinearProbe"))

    # a new probe restored from the best checkpoint tests that checkpoint's head
    fresh = OnlineLinearProbe(num_classes=4, lr=0.05)
    tester = tiny_trainer(callbacks=[fresh])
    tester.test(FixedFeatureModule(feature_dim=8), datamodule=data, ckpt_path=checkpoint.best_model_path, verbose=False)
    assert torch.equal(fresh.head.weight.cpu(), state["head"]["weight"])
    assert float(tester.callback_metrics["test/probe/acc"]) == pytest.approx(float(checkpoint.best_model_score))


def test_probe_needs_a_feature_size():
    with pytest.raises(ValueError, match="feature_dim"):
        OnlineLinearProbe(num_classes=3).setup(None, nn.Module(), "fit")
    with pytest.raises(ValueError, match="num_classes"):
        OnlineLinearProbe(num_classes=1)


class _SaveProbe(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        probe = next(c for c in trainer.callbacks if isinstance(c, OnlineLinearProbe))
        weights = torch.cat([p.detach().flatten() for p in probe.head.parameters()]).tolist()
        (self.folder / f"probe{trainer.global_rank}.json").write_text(json.dumps(weights))


@pytest.mark.slow
def test_probe_copies_stay_identical_under_ddp(tmp_path):
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_epochs=1, num_sanity_val_steps=0,
                           callbacks=[OnlineLinearProbe(num_classes=4, lr=0.05), _SaveProbe(tmp_path)])  # fmt: skip
    trainer.fit(FixedFeatureModule(), datamodule=ToyData(batch_size=8, unlabelled_every=3))
    weights = [json.loads((tmp_path / f"probe{r}.json").read_text()) for r in (0, 1)]
    assert weights[0] == weights[1]


@pytest.mark.parametrize(
    "module, data, probe, match",
    [
        (
            lambda: CountingModule(hook=False),
            ToyData,
            lambda: OnlineLinearProbe(4),
            "extract_features.*backbone.*forward",
        ),
        (CountingModule, UnlabelledTrainData, lambda: OnlineLinearProbe(4), "labelled training batches"),
        (CountingModule, ToyData, lambda: OnlineLinearProbe(3), r"num_classes=3.*datamodule's num_classes=4"),
    ],
    ids=["no-feature-hook", "no-labels", "too-few-classes"],
)
def test_incompatible_setups_fail_before_any_training_step(module, data, probe, match):
    """A module with no feature hook, training batches without labels or fewer classes than the datamodule
    has: fit stops with a sentence naming what is missing, before the first step changed any weight."""
    data, module = data(), module()
    data.num_classes = 4
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        tiny_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[probe()]).fit(module, datamodule=data)
    assert module.steps == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
