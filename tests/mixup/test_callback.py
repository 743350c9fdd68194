"""MixBatch with MultiTaskModule (every task mixed alike, the soft labels reach the task losses) and the
mixed-sample grid through TensorBoard's and W&B's image APIs."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl.mixup import hard_labels
from lightning_mtl.mixup.callback import MixBatch
from lightning_mtl.mixup.cutmix import CutMix
from lightning_mtl.mixup.linear3 import ThreeSampleMixup
from lightning_mtl.mixup.losses import soft_target_cross_entropy
from lightning_mtl.mixup.mixup import Mixup
from lightning_mtl.mixup.resizemix import ResizeMix
from lightning_mtl.mixup.visualize import log_mixed_grid
from tests.fixtures.trainers import tiny_module, tiny_multidigits, tiny_trainer


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
    module.train = lambda mode=True: module  # keep eval mode through fit
    trainer.fit(module, datamodule=tiny_multidigits())
    for (_, y), (_, original) in zip(probe.batches, before.batches):
        _assert_mixed_alike(original, y)
    for (_, y), losses in zip(probe.batches, probe.expected):
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
    assert all(image.dtype == np.uint8 for image in call["images"])  # W&B casts floats to uint8 as they are
    tensorboard.experiment.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    assert "train/mixed" in events.Tags()["images"]
    assert events.Images("train/mixed")[0].step == 7


class _PlainModule(pl.LightningModule):
    """A user's own module: a bare label tensor, the soft-target loss, and a record of each batch."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, num_classes))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.seen.append((x.detach().clone(), y.detach().clone(), logits.detach().clone()))
        return soft_target_cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _plain_loader(n, num_classes=3, batch_size=2):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 1, 4, 4, generator=generator)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    return images, labels, DataLoader(TensorDataset(images, labels), batch_size=batch_size, drop_last=False)


@pytest.mark.parametrize("mix", [Mixup(1.0), CutMix(1.0), ResizeMix(), ThreeSampleMixup(), Mixup(1.0, prob=0.5)],
                         ids=["mixup", "cutmix", "resizemix", "three", "mixup-half"])  # fmt: skip
def test_single_sample_last_batch_trains_through_unmixed_with_one_hot_targets(mix):
    """2k + 1 samples in batches of 2: the last batch holds one sample; it reaches the step unmixed, with
    the one-hot row of its label in the same [B, C] float format as the mixed batches."""
    pl.seed_everything(0)
    images, labels, loader = _plain_loader(7)
    module = _PlainModule()
    trainer = tiny_trainer(max_epochs=1, callbacks=[MixBatch(mix, num_classes=3)])
    trainer.fit(module, loader)
    assert trainer.global_step == 4 and len(module.seen) == 4
    for x, y, _ in module.seen:
        assert y.dtype == torch.float32 and y.shape == (len(x), 3)
    x, y, _ = module.seen[-1]
    assert torch.equal(x, images[6:])
    assert torch.equal(y, F.one_hot(labels[6:], 3).float())


class _AccuracyModule(_PlainModule):
    """Trains on the soft rows and tracks a torchmetrics accuracy against the hard labels."""

    def __init__(self, num_classes=3):
        super().__init__(num_classes)
        self.accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.reported = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        logits = self.seen[-1][2]
        self.reported.append((hard_labels(batch[1]).clone(), float(self.accuracy(logits, hard_labels(batch[1])))))
        return loss


class _Labels(pl.Callback):
    """Runs before MixBatch: keeps the labels the loader gave."""

    def __init__(self):
        self.labels = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].clone())


def test_training_step_accuracy_against_the_hard_labels():
    """A user's accuracy in training_step, fed hard_labels(y), is the hand-computed share of arg-max
    predictions equal to the labels the loader gave (the soft rows alone would make it meaningless)."""
    pl.seed_everything(0)
    _, _, loader = _plain_loader(40, batch_size=8)
    module, before = _AccuracyModule(), _Labels()
    trainer = tiny_trainer(max_epochs=1, callbacks=[before, MixBatch(Mixup(1.0), num_classes=3)])
    trainer.fit(module, loader)
    assert len(module.reported) == len(before.labels) == 5
    for (_, y, logits), (hard, reported), original in zip(module.seen, module.reported, before.labels):
        assert y.is_floating_point() and y.shape == (8, 3)  # the loss still sees the soft rows
        assert torch.equal(hard, original)
        assert reported == pytest.approx(float((logits.argmax(1) == original).double().mean()), abs=1e-6)


def test_hard_labels_of_every_task_and_of_unmixed_labels():
    callback = MixBatch(Mixup(), num_classes={"a": 3, "b": 4})
    labels = {"a": torch.tensor([0, 2, 1, -1]), "b": torch.tensor([3, 0, 1, 2])}
    batch = [torch.randn(4, 1, 4, 4), dict(labels)]
    callback.setup(None, None, "fit")
    callback.on_train_batch_start(None, None, batch, 0)
    assert batch[1]["a"].shape == (4, 3) and batch[1]["b"].shape == (4, 4)
    assert all(torch.equal(hard_labels(batch[1])[t], labels[t]) for t in labels)
    assert torch.equal(hard_labels(labels["a"]), labels["a"])  # integer labels are their own hard labels
    with pytest.raises(ValueError, match="hard labels"):
        hard_labels(batch[1]["a"].clone())  # a copy of the rows no longer carries them


class _WandbRecorder(WandbLogger):
    """A WandbLogger whose run is a list: its own log_image builds the wandb.Image objects, which are kept."""

    def __init__(self):
        super().__init__(offline=True)
        self.records = []

    @property
    def experiment(self):
        return type("Run", (), {"log": staticmethod(self.records.append)})()


def _stretched(images):
    # each image mapped linearly onto 0..255 (float64), the reference for what the loggers should show
    x = images.double()
    low = x.flatten(1).min(1).values[:, None, None, None]
    high = x.flatten(1).max(1).values[:, None, None, None]
    return 255 * (x - low) / (high - low)


def test_grid_pixels_reaching_wandb_and_tensorboard_span_the_full_range(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    wandb = _WandbRecorder()
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb", version=0)

    class _Trainer:
        global_rank, global_step, loggers = 0, 3, [tensorboard, wandb]

    images = 2 * torch.randn(3, 3, 8, 8) + 0.5  # normalized inputs: any range
    assert log_mixed_grid(_Trainer(), "train/mixed", images, torch.rand(3), max_images=3, nrow=3)
    (record,) = wandb.records
    expected = _stretched(images).permute(0, 2, 3, 1).numpy()
    for shown, reference in zip(record["train/mixed"], expected):
        pixels = np.asarray(shown.image.convert("RGB")).astype(np.float64)
        assert np.abs(pixels - reference).max() <= 1.0  # not the 0/1 of floats cast to uint8
    tensorboard.experiment.flush()
    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0}).Reload()
    grid = np.asarray(Image.open(io.BytesIO(events.Images("train/mixed")[0].encoded_image_string)).convert("RGB"))
    first = grid[2:10, 2:10].astype(np.float64)  # the first image sits after the 2-pixel padding
    assert np.abs(first - expected[0]).max() <= 1.0
