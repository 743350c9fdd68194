"""KNNMonitor: the weighted vote against scikit-learn and a hand loop; the online bank; DDP gathering."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from lightning_mtl.callbacks.knn import KNNMonitor, weighted_knn_predict
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.ssl_toys import CountingModule, FixedFeatureModule, ToyData, UnlabelledTrainData, clusters
from tests.fixtures.trainers import tiny_trainer


def _sklearn_knn(bank, bank_labels, k, temperature):
    """scikit-learn's weighted kNN with the same rule: cosine distance d = 1 - sim, weight exp((1 - d) / T)."""
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / temperature))  # fmt: skip
    return knn.fit(bank.numpy(), bank_labels.numpy())


@pytest.mark.parametrize("k, temperature", [(1, 0.5), (7, 0.5), (25, 0.1), (200, 0.5)])
def test_weighted_knn_agrees_with_scikit_learn(k, temperature):
    bank, bank_labels = clusters(150, num_classes=5, dim=10, noise=2.0, seed=0)
    query, _ = clusters(60, num_classes=5, dim=10, noise=2.0, seed=1)
    scores = weighted_knn_predict(query.double(), bank.double(), bank_labels, 5, k=k, temperature=temperature)
    knn = _sklearn_knn(bank.double(), bank_labels, min(k, 150), temperature)
    assert np.array_equal(scores.argmax(1).numpy(), knn.predict(query.double().numpy()))
    proba = (scores / scores.sum(1, keepdim=True)).numpy()
    assert np.allclose(proba, knn.predict_proba(query.double().numpy()), atol=1e-10)


def test_weighted_knn_agrees_with_a_hand_loop():
    bank, bank_labels = clusters(40, num_classes=3, dim=4, noise=1.5, seed=2)
    query, _ = clusters(9, num_classes=3, dim=4, noise=1.5, seed=3)
    scores = weighted_knn_predict(query, bank, bank_labels, 3, k=5, temperature=0.5)
    for q in range(len(query)):
        sims = [float(torch.dot(query[q], b) / (query[q].norm() * b.norm())) for b in bank]
        top = sorted(range(len(bank)), key=lambda i: -sims[i])[:5]
        votes = [0.0, 0.0, 0.0]
        for i in top:
            votes[int(bank_labels[i])] += math.exp(sims[i] / 0.5)
        assert scores[q].tolist() == pytest.approx(votes, rel=1e-5)


def test_weighted_knn_input_errors():
    with pytest.raises(ValueError, match="share D"):
        weighted_knn_predict(torch.randn(2, 3), torch.randn(4, 5), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="empty"):
        weighted_knn_predict(torch.randn(2, 3), torch.randn(0, 3), torch.zeros(0, dtype=torch.long), 2)


def _expected_accuracy(module, data, k=200, temperature=0.5):
    with torch.no_grad():
        keep = data.y_train >= 0
        bank = module.backbone(data.x_train[keep]).double()
        query = module.backbone(data.x_val).double()
    knn = _sklearn_knn(bank, data.y_train[keep], min(k, int(keep.sum())), temperature)
    return float((knn.predict(query.numpy()) == data.y_val.numpy()).mean())


@pytest.mark.parametrize("return_features", [True, False])
def test_monitor_logs_the_accuracy_of_the_bank_of_the_epoch(return_features):
    """Bank = the epoch's labelled training samples (negative labels left out), queries = the validation
    split; with fixed features the logged accuracy is scikit-learn's."""
    data = ToyData(unlabelled_every=5)
    module = FixedFeatureModule(return_features=return_features)
    monitor = KNNMonitor(k=10, temperature=0.5)
    trainer = tiny_trainer(max_epochs=2, callbacks=[monitor])
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["val/knn/acc"]) == pytest.approx(_expected_accuracy(module, data, k=10))
    assert module.metric_directions["val/knn/acc"] is True


def test_monitor_every_n_epochs_and_sanity_check():
    seen = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append((trainer.sanity_checking, "val/knn/acc" in trainer.callback_metrics))

    monitor = KNNMonitor(every_n_epochs=2)
    trainer = tiny_trainer(max_epochs=4, num_sanity_val_steps=1, callbacks=[monitor, Record()])
    trainer.fit(FixedFeatureModule(), datamodule=ToyData())
    # sanity check: no bank yet, nothing logged; then epochs 1 and 3 (0-based) evaluate
    assert seen[0] == (True, False)
    logged_epochs = [i for i, (_, has) in enumerate(seen[1:]) if has]
    assert logged_epochs and logged_epochs[0] == 1


def test_monitor_bank_size_cap():
    monitor = KNNMonitor(max_bank_size=20)
    tiny_trainer(max_epochs=1, callbacks=[monitor]).fit(FixedFeatureModule(), datamodule=ToyData())
    assert sum(len(f) for f in monitor._features) == 20


class _SaveBankAndAccuracy(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_validation_epoch_start(self, trainer, pl_module):
        monitor = next(c for c in trainer.callbacks if isinstance(c, KNNMonitor))
        if monitor._bank is not None:
            self.bank_size = len(monitor._bank[0])

    def on_fit_end(self, trainer, pl_module):
        result = {
            "bank": self.bank_size,
            "acc": float(trainer.callback_metrics["val/knn/acc"]),
            "rank": trainer.global_rank,
        }
        (self.folder / f"knn_rank{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_monitor_gathers_the_bank_across_ranks(tmp_path):
    """Two processes, each trains on half of the data: the bank on every rank holds all training samples
    and the accuracy is the single-process accuracy on the whole validation split."""
    data = ToyData(n_train=96, n_val=48, batch_size=8)
    module = FixedFeatureModule()
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_epochs=1, num_sanity_val_steps=0,
                           callbacks=[KNNMonitor(k=10), _SaveBankAndAccuracy(tmp_path)])  # fmt: skip
    trainer.fit(module, datamodule=data)
    results = [json.loads((tmp_path / f"knn_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["bank"] for r in results] == [96, 96]
    expected = _expected_accuracy(module, data, k=10)
    assert [r["acc"] for r in results] == pytest.approx([expected, expected])


def test_bank_features_are_normalized():
    monitor = KNNMonitor()
    monitor._features = [torch.randn(5, 3) * 10]
    monitor._labels = [torch.tensor([0, 1, 2, 1, 0])]
    bank, labels, num_classes = monitor.build_bank(torch.device("cpu"))
    assert torch.allclose(bank.norm(dim=1), torch.ones(5)) and num_classes == 3
    assert torch.allclose(bank, F.normalize(monitor._features[0], dim=1))


@pytest.mark.parametrize(
    "module, data, monitor, match",
    [
        (lambda: CountingModule(hook=False), ToyData, lambda: KNNMonitor(), "extract_features.*backbone.*forward"),
        (CountingModule, UnlabelledTrainData, lambda: KNNMonitor(), "labelled training batches"),
        (CountingModule, ToyData, lambda: KNNMonitor(num_classes=2), r"num_classes=2.*datamodule's num_classes=4"),
    ],
    ids=["no-feature-hook", "no-labels", "too-few-classes"],
)
def test_incompatible_setups_fail_before_any_training_step(module, data, monitor, match):
    """A module with no feature hook, training batches without labels or fewer classes than the datamodule
    has: fit stops with a sentence naming what is missing, before the first step changed any weight."""
    data, module = data(), module()
    data.num_classes = 4
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        tiny_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[monitor()]).fit(module, datamodule=data)
    assert module.steps == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
