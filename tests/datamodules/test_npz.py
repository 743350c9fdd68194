import numpy as np
import pytest
import torch

from lightning_mtl.datamodules import NpzMultiTaskDataModule


@pytest.fixture
def npz_file(tmp_path):
    n = 40
    inputs = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 3, 3), dtype=np.float32)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        inputs=inputs,
        colour=np.arange(n) % 4,
        size=(np.arange(n) % 2).astype(np.int32),
        depth=np.arange(n, dtype=np.float64) / 10,
        unused=np.zeros(3),
    )
    return path


def built(path, **kwargs) -> NpzMultiTaskDataModule:
    dm = NpzMultiTaskDataModule(str(path), **kwargs)
    dm.setup("fit")
    return dm


def test_roundtrip(npz_file):
    dm = built(npz_file, tasks=["colour", "size"], val_fraction=0.2, test_fraction=0.1, batch_size=8)
    assert dm.task_names == ("colour", "size")
    assert dm.num_classes == {"colour": 4, "size": 2}
    assert dm.input_shape == (2, 3, 3)
    sizes = [len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")]
    assert sizes == [28, 8, 4]
    rows = np.concatenate([dm.split_rows[s] for s in ("train", "val", "test")])
    assert sorted(rows.tolist()) == list(range(40))
    for split in ("train", "val", "test"):
        ds = getattr(dm, f"{split}_set")
        row = ds.inputs[:, 0, 0, 0].long()  # the fixture writes the row number into the inputs
        assert torch.equal(ds.targets["colour"], row % 4)
        assert torch.equal(ds.targets["size"], row % 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2, 3, 3) and x.dtype == torch.float32
    assert set(y) == {"colour", "size"} and y["colour"].dtype == torch.long and y["size"].dtype == torch.long


def test_split_is_seeded(npz_file):
    a, b, c = (built(npz_file, tasks=["size"], seed=s) for s in (1, 1, 2))
    assert np.array_equal(a.split_rows["val"], b.split_rows["val"])
    assert not np.array_equal(a.split_rows["val"], c.split_rows["val"])


def test_regression_targets_and_metadata_before_setup(npz_file):
    dm = NpzMultiTaskDataModule(str(npz_file), tasks=["depth", "colour"])
    assert dm.num_classes == {"depth": 1, "colour": 4}  # available before setup
    assert dm.task_types == {"depth": "regression", "colour": "classification"}
    dm.setup()
    assert dm.train_set.targets["depth"].dtype == torch.float32


def test_input_layouts(tmp_path):
    path = tmp_path / "hw.npz"
    np.savez(path, images=np.full((10, 5, 6), 255, dtype=np.uint8), label=np.arange(10))
    dm = built(path, tasks=["label"], inputs_key="images")
    assert dm.input_shape == (1, 5, 6)
    assert float(dm.train_set.inputs.max()) == 1.0
    path = tmp_path / "hwc.npz"
    np.savez(path, inputs=np.zeros((10, 5, 6, 3), dtype=np.float32), label=np.arange(10))
    assert built(path, tasks=["label"], channels_last=True).input_shape == (3, 5, 6)


def test_normalize_uses_training_statistics(npz_file):
    dm = built(npz_file, tasks=["size"], normalize=True)
    x = dm.train_set.inputs
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert dm.mean.shape == (1, 2, 1, 1)


def test_missing_file_says_what_is_expected(tmp_path):
    missing = tmp_path / "missing.npz"
    dm = NpzMultiTaskDataModule(str(missing), tasks=["a", "b"])
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(missing) in message and "NpzMultiTaskDataModule" in message
    assert ".npz" in message and "'inputs'" in message and "a, b" in message


def test_missing_task_key_lists_the_available_keys(npz_file):
    with pytest.raises(KeyError) as info:
        built(npz_file, tasks=["colour", "shape"])
    message = str(info.value)
    assert "'shape'" in message and "colour" in message and "depth" in message and "inputs" in message


def test_length_mismatch_names_the_arrays(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((10, 1, 2, 2)), good=np.arange(10), bad=np.arange(9))
    with pytest.raises(ValueError, match="'bad'.*9 rows.*'inputs'.*10 rows"):
        built(path, tasks=["good", "bad"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tasks": []},
        {"tasks": ["a", "a"]},
        {"tasks": ["inputs"]},
        {"tasks": ["a"], "val_fraction": 0.6, "test_fraction": 0.4},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        NpzMultiTaskDataModule("whatever.npz", **kwargs)


def test_labels_beyond_a_tasks_num_classes_fail_at_setup(tmp_path):
    """The data's whole label set is compared with the tasks' num_classes once, before any step."""
    from torch import nn

    from lightning_mtl import ClassificationTask, MultiTaskModule
    from tests.fixtures.trainers import tiny_trainer

    path = tmp_path / "six.npz"
    rng = np.random.default_rng(0)
    np.savez(path, inputs=rng.normal(size=(24, 5)).astype(np.float32), colour=np.arange(24) % 6)
    dm = NpzMultiTaskDataModule(str(path), tasks=["colour"], batch_size=4)
    module = MultiTaskModule(nn.Linear(5, 8), tasks={"colour": ClassificationTask(4)})
    trainer = tiny_trainer(max_epochs=1)
    with pytest.raises(ValueError) as info:
        trainer.fit(module, datamodule=dm)
    message = str(info.value)
    assert "task 'colour'" in message and "0..5" in message and "num_classes=4" in message, message
    assert "model.init_args.tasks.colour.init_args.num_classes" in message and "6" in message, message
    assert trainer.global_step == 0


def test_a_truncated_npz_names_the_file(tmp_path, npz_file):
    truncated = tmp_path / "truncated.npz"
    data = npz_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        built(truncated, tasks=["colour"])
    message = str(info.value)
    assert str(truncated) in message and "truncated" in message and "pickle" not in message, message


@pytest.mark.parametrize("content", [b"colour,size\n1,2\n", b"\x80\x04K\x01."])  # a CSV, a pickle
def test_a_file_of_another_format_names_the_file_and_never_suggests_unpickling(tmp_path, content):
    other = tmp_path / "other.npz"
    other.write_bytes(content)
    with pytest.raises(ValueError) as info:
        built(other, tasks=["colour"])
    message = str(info.value)
    assert str(other) in message and "numpy.savez" in message and "allow_pickle" not in message, message


def test_an_object_array_names_the_key_and_is_never_unpickled(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, inputs=np.zeros((4, 2)), colour=np.array([1, "a", None, 2.0], dtype=object))
    with pytest.raises(ValueError) as info:
        built(path, tasks=["colour"])
    message = str(info.value)
    assert str(path) in message and "'colour'" in message and "allow_pickle" not in message, message
