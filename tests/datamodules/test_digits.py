import numpy as np
import pytest
import torch

from lightning_mtl.datamodules import Digits, MultiDigits
from lightning_mtl.datamodules.digits import load_sklearn_digits


def built(**kwargs) -> Digits:
    dm = Digits(**kwargs)
    dm.setup("fit")
    return dm


def test_default_batches():
    dm = built()
    assert dm.task_names == ("digit",) and dm.num_classes == {"digit": 10} and dm.input_shape == (1, 8, 8)
    assert sum(len(getattr(dm, f"{s}_set")) for s in ("train", "val", "test")) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8)
    assert set(y) == {"digit"} and y["digit"].dtype == torch.long


def test_plain_targets_custom_name_upscaling_and_rgb():
    dm = built(task_name="number", image_size=16, channels=3, as_dict=False, batch_size=5)
    assert dm.input_shape == (3, 16, 16) and dm.task_names == ("number",)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    assert isinstance(y, torch.Tensor) and y.dtype == torch.long and y.shape == (5,)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_split_is_seeded_disjoint_and_shared_with_multidigits():
    a, b, c = built(seed=3), built(seed=3), built(seed=4)
    images, labels = load_sklearn_digits()
    for split in ("train", "val", "test"):
        assert np.array_equal(a.pools[split], b.pools[split])
        assert not np.array_equal(a.pools[split], c.pools[split])
        ds = getattr(a, f"{split}_set")
        assert np.array_equal(ds.targets["digit"].numpy(), labels[a.pools[split]])
        raw = ds.inputs[:, 0] * a.std + a.mean
        np.testing.assert_allclose(raw.numpy(), images[a.pools[split]], atol=1e-5)
    assert not set(a.pools["train"]) & set(a.pools["val"])
    assert not set(a.pools["train"]) & set(a.pools["test"])
    assert not set(a.pools["val"]) & set(a.pools["test"])
    md = MultiDigits(num_train=10, num_val=10, num_test=10, seed=3)
    md.setup()
    for split in ("train", "val", "test"):
        assert np.array_equal(md.pools[split], a.pools[split])


@pytest.mark.parametrize("kwargs", [{"channels": 2}, {"image_size": 0}, {"split_fractions": (0.5, 0.2, 0.2)}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        built(**kwargs)
