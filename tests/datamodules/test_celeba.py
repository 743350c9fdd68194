"""CelebA on a fixture in the torchvision layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_mtl.datamodules.celeba import CelebA, attribute_task_name
from tests.fixtures.celeba import CELEBA_ATTRIBUTES, write_celeba


def test_forty_tasks_labels_and_partition(tmp_path):
    values = write_celeba(tmp_path, n=9, size=10)
    dm = CelebA(tmp_path, image_size=8, batch_size=3)
    assert len(dm.task_names) == 40
    assert dm.task_names[0] == "five_o_clock_shadow" and dm.task_names[-1] == "young"
    assert all(name.isidentifier() for name in dm.task_names)
    dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [3, 3, 3]
    assert dm.val_set.files == ["000002.jpg", "000005.jpg", "000008.jpg"]  # partition code 1
    x, y = dm.val_set[1]
    assert x.shape == (3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    expected = (values[4] > 0).astype(np.int64)  # image 000005 is row 4
    assert [int(y[name]) for name in dm.task_names] == expected.tolist()
    batch_x, batch_y = next(iter(dm.test_dataloader()))
    assert batch_x.shape == (3, 3, 8, 8) and batch_y["smiling"].dtype == torch.long


def test_attribute_subset_by_file_or_task_name(tmp_path):
    values = write_celeba(tmp_path, n=3)
    dm = CelebA(tmp_path, attributes=["Smiling", "five_o_clock_shadow"], image_size=4)
    assert dm.task_names == ("smiling", "five_o_clock_shadow")
    dm.setup()
    _, y = dm.train_set[0]
    smiling = CELEBA_ATTRIBUTES.index("Smiling")
    assert int(y["smiling"]) == int(values[0, smiling] > 0) and int(y["five_o_clock_shadow"]) == int(values[0, 0] > 0)
    with pytest.raises(ValueError, match="no attribute"):
        CelebA(tmp_path, attributes=["Cheerful"]).task_names  # noqa: B018  (reading the property raises)
    assert attribute_task_name("Wearing_Hat") == "wearing_hat"


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CelebA: data not found.*img_align_celeba.*list_eval_partition"):
        CelebA(tmp_path).setup()
