"""NYUv2 (and the shared .npy reader) on a fixture in the MTAN / LibMTL layout."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lightning_mtl.datamodules._dense_npy import DenseNpyDataset
from lightning_mtl.datamodules.nyuv2 import NYUv2
from tests.fixtures.dense import write_nyuv2

TASKS = {"segmentation": ("label", "segmentation"), "depth": ("depth", "depth"), "normal": ("normal", "normal")}


def test_samples_are_the_stored_arrays(tmp_path):
    written = write_nyuv2(tmp_path, n_train=3, n_val=2)
    dm = NYUv2(tmp_path, augment=False, batch_size=2)
    assert dm.task_names == ("segmentation", "depth", "normal")
    assert dm.num_classes == {"segmentation": 13, "depth": 1, "normal": 3}
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2 and dm.test_set is dm.val_set
    image, targets = dm.val_set[1]
    np.testing.assert_array_equal(image.numpy(), written["val"]["image"][1].transpose(2, 0, 1))
    assert targets["segmentation"].dtype == torch.long
    np.testing.assert_array_equal(targets["segmentation"].numpy(), written["val"]["label"][1].astype(np.int64))
    assert (targets["segmentation"] == -1).any()  # void kept as -1
    np.testing.assert_array_equal(targets["depth"].numpy(), written["val"]["depth"][1].transpose(2, 0, 1))
    np.testing.assert_array_equal(targets["normal"].numpy(), written["val"]["normal"][1].transpose(2, 0, 1))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 12, 16) and y["segmentation"].shape == (2, 12, 16)
    assert y["depth"].shape == (2, 1, 12, 16) and y["normal"].shape == (2, 3, 12, 16)


def test_task_subset_and_resize(tmp_path):
    write_nyuv2(tmp_path)
    dm = NYUv2(tmp_path, tasks=["depth"], augment=False, image_size=(6, 8))
    dm.setup()
    image, targets = dm.train_set[0]
    assert list(targets) == ["depth"] and image.shape == (3, 6, 8) and targets["depth"].shape == (1, 6, 8)
    assert dm.input_shape == (3, 6, 8)
    with pytest.raises(ValueError, match="subset"):
        NYUv2(tmp_path, tasks=["edges"])


def test_flip_mirrors_the_normals_x_component(tmp_path, monkeypatch):
    written = write_nyuv2(tmp_path, n_train=1)
    dataset = DenseNpyDataset(str(tmp_path / "train"), TASKS, augment=True, scales=(1.0,))
    monkeypatch.setattr(random, "random", lambda: 0.0)  # always flip
    image, targets = dataset[0]
    normal = written["train"]["normal"][0].transpose(2, 0, 1)[:, :, ::-1]
    np.testing.assert_allclose(image.numpy(), written["train"]["image"][0].transpose(2, 0, 1)[:, :, ::-1])
    np.testing.assert_allclose(targets["normal"][0].numpy(), -normal[0])
    np.testing.assert_allclose(targets["normal"][1:].numpy(), normal[1:])


def test_scale_crop_zooms_in_and_divides_depth_by_the_zoom(tmp_path, monkeypatch):
    written = write_nyuv2(tmp_path, n_train=1)
    dataset = DenseNpyDataset(str(tmp_path / "train"), TASKS, augment=True, scales=(2.0,))
    monkeypatch.setattr(random, "random", lambda: 1.0)  # never flip
    monkeypatch.setattr(random, "randint", lambda a, b: 0)  # crop the upper left quarter
    _, targets = dataset[0]
    depth = written["train"]["depth"][0][:6, :8, 0]
    expected = np.repeat(np.repeat(depth, 2, 0), 2, 1) / 2.0  # nearest upsampling of the crop
    np.testing.assert_allclose(targets["depth"][0].numpy(), expected, rtol=1e-6)
    label = written["train"]["label"][0][:6, :8]
    np.testing.assert_array_equal(targets["segmentation"].numpy(), np.repeat(np.repeat(label, 2, 0), 2, 1))


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"NYUv2: data not found.*image/, label/, depth/, normal/.*lorenmt/mtan"
    ):
        NYUv2(tmp_path / "nowhere").setup()
    write_nyuv2(tmp_path)
    (tmp_path / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(ValueError, match="without gaps"):
        NYUv2(tmp_path).setup()


def test_a_truncated_sample_file_names_the_file(tmp_path):
    write_nyuv2(tmp_path, n_train=2, n_val=1)
    broken = tmp_path / "train" / "depth" / "1.npy"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    dataset = DenseNpyDataset(str(tmp_path / "train"), TASKS)
    dataset[0]  # the other samples still load
    with pytest.raises(ValueError) as info:
        dataset[1]
    message = str(info.value)
    assert str(broken) in message and "allow_pickle" not in message, message
