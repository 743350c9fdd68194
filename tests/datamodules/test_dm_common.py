import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl.datamodules import EpochShuffleSampler, MultiDigits, check_data_path
from lightning_mtl.datamodules._common import TensorMultiTaskDataset, split_indices


def test_sampler_is_a_permutation():
    sampler = EpochShuffleSampler(100, seed=3)
    order = list(sampler)
    assert len(sampler) == 100
    assert sorted(order) == list(range(100))
    assert order != list(range(100))


def test_sampler_is_deterministic_per_epoch_and_changes_across_epochs():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again gives the same order within an epoch
    b.set_epoch(5)
    assert list(a) != list(b)
    # a "resumed" sampler that jumps straight to epoch 4 sees what the uninterrupted one saw
    fresh = EpochShuffleSampler(50, seed=1)
    fresh.set_epoch(4)
    assert list(fresh) == list(a)


def test_sampler_seed_and_options():
    assert list(EpochShuffleSampler(30, seed=0)) != list(EpochShuffleSampler(30, seed=1))
    assert list(EpochShuffleSampler(range(7), shuffle=False)) == list(range(7))
    assert len(EpochShuffleSampler([1, 2, 3])) == 3
    assert list(EpochShuffleSampler(0)) == []


def test_check_data_path(tmp_path):
    existing = tmp_path / "here.npz"
    existing.write_bytes(b"")
    check_data_path(existing, "MyData", "do something")  # no error
    missing = tmp_path / "nowhere" / "data.npz"
    with pytest.raises(FileNotFoundError) as info:
        check_data_path(missing, "MyData", "download it with `make data`.")
    message = str(info.value)
    assert "MyData" in message and str(missing) in message and "download it with `make data`" in message
    assert message.count("\n") == 0


def test_split_indices_disjoint_and_complete():
    parts = split_indices(101, (0.7, 0.15, 0.15), np.random.default_rng(0))
    assert [len(parts[s]) for s in ("train", "val", "test")] == [71, 15, 15]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(101))
    with pytest.raises(ValueError):
        split_indices(10, (0.5, 0.5, 0.5), np.random.default_rng(0))


def test_default_collate_gives_the_batch_contract():
    inputs = torch.randn(10, 1, 4, 4)
    targets = {"left": torch.arange(10), "right": torch.arange(10) % 3}
    dataset = TensorMultiTaskDataset(inputs, targets)
    x, y = dataset[3]
    assert torch.equal(x, inputs[3]) and y == {"left": 3, "right": 0}
    xb, yb = next(iter(DataLoader(dataset, batch_size=4)))
    assert xb.shape == (4, 1, 4, 4) and xb.dtype == torch.float32
    assert set(yb) == {"left", "right"} and yb["left"].dtype == torch.long
    assert torch.equal(yb["right"], torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="right"):
        TensorMultiTaskDataset(inputs, {"right": torch.arange(9)})


class _RecordOrder(pl.LightningModule):
    """Records the labels of each training batch; learns nothing."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(y["left"].tolist())
        return (self.weight * x.mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_of_the_train_sampler():
    dm = MultiDigits(num_train=12, num_val=4, num_test=4, batch_size=12, seed=5)
    module = _RecordOrder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    labels = dm.train_set.targets["left"]
    expected = []
    for epoch in range(3):
        sampler = EpochShuffleSampler(12, seed=5)
        sampler.set_epoch(epoch)
        expected.append(labels[sampler.permutation()].tolist())
    assert expected[0] != expected[1] != expected[2]
    assert module.seen == expected
