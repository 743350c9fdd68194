"""MixBatch with MultiTaskModule (every task mixed alike, the soft labels reach the task losses) and the
mixed-sample grid through TensorBoard's and W&B's image APIs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_mtl.mixup.callback import MixBatch
from lightning_mtl.mixup.cutmix import CutMix
from lightning_mtl.mixup.mixup import Mixup
from lightning_mtl.mixup.visualize import log_mixed_grid
from tests.helpers import tiny_module, tiny_multidigits, tiny_trainer


class _Probe(pl.Callback):
    """Runs after MixBatch: keeps the batch the module receives and the loss the module computes on it."""

    def __init__(self):
        self.batches, self.expected = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.batches.append((x.clone(), {k: v.clone() for k, v in y.items()}))
        with torch.no_grad():  # the hand-written mixed loss of each task at the current weights
            z = pl_module.encoder(x)
            self.expected.append({t: -(y[t] * F.log_softmax(pl_module.heads[t](z), 1)).sum(1).mean() for t in y})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        logged = trainer.callback_metrics
        self.expected[-1] = {t: (v, float(logged[f"train/{t}/loss"])) for t, v in self.expected[-1].items()}


class _Before(pl.Callback):
    """Runs before MixBatch: keeps the original labels."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((None, {k: v.clone() for k, v in batch[1].items()}))


def _assert_mixed_alike(original, mixed):
    """Each row of both tasks is w * onehot(y[i]) + (1 - w) * onehot(y[j]) with the same j and w."""
    left, right = mixed["left"], mixed["right"]
    weights = [w for w in left.unique().tolist() if 0 < w < 1] or [1.0]
    eye = torch.eye(10)
    for i in range(len(left)):
        found = any(
            torch.allclose(left[i], w * eye[original["left"][i]] + (1 - w) * eye[original["left"][j]], atol=1e-6)
            and torch.allclose(right[i], w * eye[original["right"][i]] + (1 - w) * eye[original["right"][j]], atol=1e-6)
            for j in range(len(left)) for w in weights
        )  # fmt: skip
        assert found, f"row {i} is not mixed alike in both tasks"


@pytest.mark.parametrize("mix", [Mixup(1.0), CutMix(1.0)], ids=["mixup", "cutmix"])
def test_multitask_module_trains_on_the_mixed_soft_labels(mix):
    torch.manual_seed(0)
    probe, before = _Probe(), _Before()
    module = tiny_module()
    module.eval()  # BatchNorm in eval mode: the probe's forward equals the module's
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0, callbacks=[before, MixBatch(mix), probe])
    module.train = lambda mode=True: module  # keep eval mode through fit  # noqa: E731
    trainer.fit(module, datamodule=tiny_multidigits())
    for (_, y), (_, original) in zip(probe.batches, before.batches):
        _assert_mixed_alike(original, y)
    for (x, y), losses in zip(probe.batches, probe.expected):
        assert y["left"].shape == (32, 10) and y["left"].dtype == torch.float32
        assert torch.allclose(y["left"].sum(1), torch.ones(32))
        for task, (hand, logged) in losses.items():
            assert logged == pytest.approx(float(hand), rel=1e-4), task


def test_tuple_batch_with_bare_labels_is_a_clear_error():
    callback = MixBatch(Mixup())
    callback._classes = 3
    with pytest.raises(TypeError, match="cannot be changed"):
        callback.on_train_batch_start(None, None, (torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)), 0)


def test_grid_goes_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    calls = []
    wandb = WandbLogger(save_dir=str(tmp_path), offline=True)
    monkeypatch.setattr(wandb, "log_image", lambda **kwargs: calls.append(kwargs))
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version=0)

    class _Trainer:
        global_rank, global_step, loggers = 0, 7, [tensorboard, wandb]

    images = torch.randn(5, 3, 8, 8)
    lambdas = torch.tensor([[0.3, 0.7]] * 5)
    assert log_mixed_grid(_Trainer(), "train/mixed", images, lambdas, max_images=4)
    (call,) = calls
    assert call["key"] == "train/mixed" and call["step"] == 7 and len(call["images"]) == 4
    assert call["caption"][0] == "lam=0.30/0.70"
    assert 0 <= float(call["images"][0].min()) <= float(call["images"][0].max()) <= 1
    tensorboard.experiment.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    assert "train/mixed" in events.Tags()["images"]
    assert events.Images("train/mixed")[0].step == 7
