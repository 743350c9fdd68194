"""DigitsTasks: each derived task's inputs and labels against the plain digits; the task-balanced loader."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl import MISSING_LABEL
from lightning_mtl.datamodules import DigitsTasks
from lightning_mtl.datamodules._common import TensorMultiTaskDataset
from lightning_mtl.datamodules.digits_tasks import DIGITS_TASKS, TaskGroups, concat_groups


def _plain_and(task: str):
    """The train split of the plain digits and of ``task``, unnormalised, in the same image order."""
    plain, other = DigitsTasks("identity", normalize=False), DigitsTasks(task, normalize=False)
    plain.setup(), other.setup()
    return plain.train_set, other.train_set


def test_input_maps_match_the_definitions():
    base, rot = _plain_and("rotate90")
    x, xr = base.inputs[:5, 0], rot.inputs[:5, 0]
    # rotate90 counter-clockwise: the top row becomes the left column read bottom-up
    assert torch.equal(xr[:, :, 0], x[:, 0, :].flip(-1))
    _, inv = _plain_and("invert")
    assert torch.equal(inv.inputs[:5, 0], 1.0 - x)
    _, hf = _plain_and("hflip")
    assert torch.equal(hf.inputs[:5, 0, :, 0], x[:, :, -1])
    dm = DigitsTasks("permute", normalize=False)
    dm.setup()
    perm = dm.pixel_permutation()
    assert sorted(perm.tolist()) == list(range(64)) and not torch.equal(perm, torch.arange(64))
    assert torch.equal(dm.train_set.inputs[:5, 0].flatten(-2), x.flatten(-2)[:, perm])
    assert torch.equal(perm, DigitsTasks("permute", permutation_seed=0).pixel_permutation())
    assert not torch.equal(perm, DigitsTasks("permute", permutation_seed=1).pixel_permutation())


@pytest.mark.parametrize("task, classes", [("parity", 2), ("mod3", 3)])
def test_label_maps(task, classes):
    base, derived = _plain_and(task)
    assert torch.equal(derived.inputs, base.inputs)
    assert torch.equal(derived.targets[task], base.targets["identity"] % classes)
    assert DigitsTasks(task).num_classes == {task: classes}


def test_several_tasks_mark_every_other_label_missing_and_normalise_alike():
    dm = DigitsTasks(["identity", "invert", "parity"])
    dm.setup()
    n = 1257
    assert len(dm.train_set) == 3 * n
    targets = dm.train_set.targets
    present = torch.stack([targets[t] != MISSING_LABEL for t in dm.task_names])  # [T, N]
    assert torch.equal(present.sum(0), torch.ones(3 * n, dtype=torch.long))  # exactly one task per sample
    assert present[1, n : 2 * n].all()
    # the same affine map for every task: inverted inputs are (1 - x - mean) / std of the plain images
    x = dm.train_set.inputs
    assert torch.allclose(x[n : 2 * n] * dm.std + dm.mean, 1.0 - (x[:n] * dm.std + dm.mean), atol=1e-6)


def test_balanced_loader_has_equal_shares_and_is_seeded_per_epoch():
    dm = DigitsTasks(["rotate90", "parity", "mod3", "hflip"], batch_size=32)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 1257 // 8
    for x, y in batches:
        assert x.shape == (32, 1, 8, 8)
        counts = [int((y[t] != MISSING_LABEL).sum()) for t in dm.task_names]
        assert counts == [8, 8, 8, 8]
    # every task's training sample appears at most once per epoch, each task within its own range
    for t, perm in enumerate(loader.dataset.perms):
        assert len(set(perm.tolist())) == len(perm) and perm.min() >= t * 1257 and perm.max() < (t + 1) * 1257
    first = [int(i) for i in loader.sampler]
    loader.sampler.set_epoch(1)
    assert [int(i) for i in loader.sampler] != first
    loader.sampler.set_epoch(0)
    assert [int(i) for i in loader.sampler] == first


def test_groups_take_one_sample_per_task_and_bad_input_is_refused():
    data = TensorMultiTaskDataset(torch.arange(35.0), {"a": torch.arange(35)})
    groups = TaskGroups(data, [10, 25], seed=0)
    assert len(groups) == 10
    x, y = groups[3]
    assert x.shape == (2,) and x[0] < 10 <= x[1] and torch.equal(y["a"], x.long())
    batch = concat_groups([groups[0], groups[1]])
    assert batch[0].shape == (4,) and batch[1]["a"].shape == (4,)
    with pytest.raises(ValueError, match="unknown DigitsTasks task 'rotate45'"):
        DigitsTasks(["identity", "rotate45"])
    with pytest.raises(ValueError, match="distinct"):
        DigitsTasks(["parity", "parity"])


def test_every_registered_task_builds():
    dm = DigitsTasks(list(DIGITS_TASKS), batch_size=64)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 8, 8) and set(y) == set(DIGITS_TASKS)


def _rows(x):
    return sorted(tuple(r.tolist()) for r in x.flatten(1))


@pytest.mark.parametrize("tasks", ["parity", ["rotate90", "parity", "mod3"]])
def test_train_split_val_trains_on_exactly_the_validation_samples(tasks):
    """aTLAS's recipe learns on the validation split: every training sample (image and labels) of an epoch
    is a validation sample, each once, and the validation loader is unchanged."""
    dm = DigitsTasks(tasks, batch_size=30, train_split="val")
    dm.setup()
    batches = list(dm.train_dataloader())
    x = torch.cat([b[0] for b in batches])
    names = dm.task_names
    y = torch.stack([torch.cat([b[1][t] for b in batches]) for t in names], 1).float()
    val_x, val_y = zip(*[(vx, torch.stack([vy[t] for t in names], 1)) for vx, vy in dm.val_dataloader()])
    val = _rows(torch.cat([torch.cat(val_x).flatten(1), torch.cat(val_y).float()], 1))
    trained = _rows(torch.cat([x.flatten(1), y], 1))
    assert len(trained) == len(val) == 270 * len(names)  # 30 // T per task divides 270: nothing dropped
    assert trained == val
    train_x = torch.cat([b[0] for b in DigitsTasks(tasks, batch_size=30).train_dataloader()])
    assert len(train_x) > len(x) and not set(_rows(train_x)) & set(_rows(x))  # the default stays the train split
    with pytest.raises(ValueError, match="train_split must be 'train' or 'val', got 'test'"):
        DigitsTasks(tasks, train_split="test")
