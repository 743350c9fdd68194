"""Tabular multi-task data from CSV."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lightning_mtl.datamodules.tabular import TabularMultiTask
from lightning_mtl.multitask.tasks import MISSING_LABEL
from tests.fixtures.tabular import write_table


def test_columns_become_features_and_typed_tasks(tmp_path):
    path = tmp_path / "table.csv"
    cols = write_table(path, n=40)
    dm = TabularMultiTask(str(path), tasks=["kind", "level", "score"], normalize=False, val_fraction=0.25,
                          test_fraction=0.25, batch_size=8)  # fmt: skip
    assert dm.input_shape == (2,)
    assert dm.num_classes == {"kind": 2, "level": 3, "score": 1}
    dm.setup()
    assert dm.classes["kind"] == ["cat", "dog"] and dm.classes["level"] == ["0", "1", "2"]
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 40 and len(dm.val_set) == 10
    everything = torch.cat([dm.train_set.inputs, dm.val_set.inputs, dm.test_set.inputs])
    rows = {round(float(x[0]), 5): i for i, x in enumerate(everything)}
    assert len(rows) == 40
    sets = (dm.train_set, dm.val_set, dm.test_set)
    for s in sets:
        for x, kind, level, score in zip(s.inputs, s.targets["kind"], s.targets["level"], s.targets["score"]):
            i = int(np.argmin(np.abs(cols["f1"] - float(x[0]))))
            assert kind == (MISSING_LABEL if i == 3 else ["cat", "dog"].index(cols["kind"][i]))
            assert level == cols["level"][i] and kind.dtype == torch.long
            if i == 4:
                assert torch.isnan(score)
            else:
                assert float(score) == pytest.approx(cols["score"][i], abs=1e-5)
            if i == 5:  # a missing feature takes the training mean
                assert float(x[1]) == pytest.approx(float(np.nanmean(dm.train_set.inputs[:, 1].numpy())), abs=0.2)


def test_normalization_and_split_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,y,split\n1,10,0,train\n3,30,1,train\n5,50,0,val\n7,70,1,test\n")
    dm = TabularMultiTask(str(path), tasks=["y"], split_column="split", classification=["y"])
    dm.setup()
    assert [len(s) for s in (dm.train_set, dm.val_set, dm.test_set)] == [2, 1, 1]
    torch.testing.assert_close(dm.mean, torch.tensor([2.0, 20.0]))
    # standardized with the training statistics (std of 1, 3 is sqrt(2))
    torch.testing.assert_close(dm.val_set.inputs, torch.tensor([[3 / 2**0.5, 30 / (10 * 2**0.5)]]))


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="TabularMultiTask"):
        TabularMultiTask(str(tmp_path / "none.csv"), tasks=["y"]).setup()
    path = tmp_path / "t.csv"
    path.write_text("a,y\n1,0\nx,1\n")
    with pytest.raises(ValueError, match="not a number"):
        TabularMultiTask(str(path), tasks=["y"]).setup()
    with pytest.raises(ValueError, match="no column"):
        TabularMultiTask(str(path), tasks=["z"]).setup()
    with pytest.raises(ValueError, match="identifiers"):
        TabularMultiTask(str(path), tasks=["bad name"])
    (tmp_path / "t.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pyarrow"):
        TabularMultiTask(str(tmp_path / "t.parquet"), tasks=["y"]).setup()
