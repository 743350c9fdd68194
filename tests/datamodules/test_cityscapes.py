"""Cityscapes on a fixture in the MTAN .npy layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_mtl.datamodules.cityscapes import Cityscapes
from tests.fixtures.dense import write_cityscapes


def test_samples_are_the_stored_arrays(tmp_path):
    written = write_cityscapes(tmp_path, n_train=2, n_val=2)
    dm = Cityscapes(tmp_path, augment=False, batch_size=2)
    assert dm.task_names == ("segmentation", "depth") and dm.num_classes == {"segmentation": 7, "depth": 1}
    dm.setup()
    image, targets = dm.train_set[1]
    np.testing.assert_array_equal(image.numpy(), written["train"]["image"][1].transpose(2, 0, 1))
    np.testing.assert_array_equal(targets["segmentation"].numpy(), written["train"]["label_7"][1].astype(np.int64))
    np.testing.assert_array_equal(targets["depth"].numpy(), written["train"]["depth"][1].transpose(2, 0, 1))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 12, 16) and y["segmentation"].dtype == torch.long


def test_label_set_and_errors(tmp_path):
    with pytest.raises(ValueError, match="7 or 19"):
        Cityscapes(tmp_path, num_classes=13)
    write_cityscapes(tmp_path)
    with pytest.raises(FileNotFoundError, match="label_19/"):
        Cityscapes(tmp_path, num_classes=19).setup()
