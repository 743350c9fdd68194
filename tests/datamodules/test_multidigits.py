import numpy as np
import pytest
import torch

from lightning_mtl.datamodules import EpochShuffleSampler, MultiDigits
from lightning_mtl.datamodules.digits import load_sklearn_digits

SPLITS = ("train", "val", "test")


def small(**kwargs) -> MultiDigits:
    defaults = dict(num_train=600, num_val=200, num_test=200, seed=0)
    defaults.update(kwargs)
    dm = MultiDigits(**defaults)
    dm.setup("fit")
    return dm


def canvases(dm: MultiDigits, split: str) -> np.ndarray:
    """The split's images back in [0, 1], ``[N, S, S]``."""
    x = getattr(dm, f"{split}_set").inputs
    return (x[:, 0] * dm.std + dm.mean).numpy()


def test_defaults_and_metadata():
    dm = MultiDigits()
    assert dm.task_names == ("left", "right")
    assert dm.num_classes == {"left": 10, "right": 10}
    assert dm.input_shape == (1, dm.canvas_size, dm.canvas_size)
    assert dm.canvas_size == 8 + dm.offset + dm.jitter
    assert dm.batch_size == 256
    assert dm.hparams["num_train"] == 20000 and dm.hparams["num_val"] == 2000 and dm.hparams["num_test"] == 2000
    assert repr(dm).startswith("MultiDigits(") and "offset=" in repr(dm)


def test_default_sizes_and_batch_format():
    dm = MultiDigits()
    dm.setup("fit")
    assert [len(getattr(dm, f"{s}_set")) for s in SPLITS] == [20000, 2000, 2000]
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffleSampler)
    assert loader.drop_last is False
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (256, *dm.input_shape)
    assert set(y) == {"left", "right"}
    for labels in y.values():
        assert labels.dtype == torch.long and labels.shape == (256,)
        assert 0 <= int(labels.min()) and int(labels.max()) <= 9
    # standardized with training statistics
    train = dm.train_set.inputs
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std()) - 1) < 1e-3
    for make in (dm.val_dataloader, dm.test_dataloader, dm.predict_dataloader):
        xb, yb = next(iter(make()))
        assert xb.shape[1:] == dm.input_shape and set(yb) == {"left", "right"}


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = small(seed=7), small(seed=7), small(seed=8)
    for split in SPLITS:
        sa, sb, sc = (getattr(m, f"{split}_set") for m in (a, b, c))
        assert torch.equal(sa.inputs, sb.inputs)
        assert all(torch.equal(sa.targets[t], sb.targets[t]) for t in ("left", "right"))
        assert np.array_equal(a.source_indices[split], b.source_indices[split])
        assert not np.array_equal(a.source_indices[split], c.source_indices[split])
        assert not torch.equal(sa.inputs, sc.inputs)


def test_changing_num_train_keeps_val_and_test():
    a, b = small(num_train=100), small(num_train=300)
    for split in ("val", "test"):
        assert np.array_equal(a.source_indices[split], b.source_indices[split])


def test_source_pools_are_disjoint_and_pairs_stay_in_their_pool():
    dm = small()
    pools = dm.pools
    assert sum(len(p) for p in pools.values()) == 1797
    for s1 in SPLITS:
        for s2 in SPLITS:
            if s1 < s2:
                assert not set(pools[s1]) & set(pools[s2])
    used = {}
    for split in SPLITS:
        sources = dm.source_indices[split]
        assert sources.shape == (len(getattr(dm, f"{split}_set")), 2)
        assert np.isin(sources, pools[split]).all()
        assert (sources[:, 0] != sources[:, 1]).all()
        used[split] = set(sources.ravel().tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]


def test_labels_are_the_source_digits_labels():
    dm = small()
    _, labels = load_sklearn_digits()
    for split in SPLITS:
        sources = dm.source_indices[split]
        targets = getattr(dm, f"{split}_set").targets
        assert np.array_equal(targets["left"].numpy(), labels[sources[:, 0]])
        assert np.array_equal(targets["right"].numpy(), labels[sources[:, 1]])


@pytest.mark.parametrize("kwargs", [{}, {"offset": 3, "jitter": 1}, {"offset": 2, "jitter": 1, "canvas_size": 13}])
def test_layout_left_digit_upper_left_right_digit_lower_right(kwargs):
    dm = small(num_train=200, **kwargs)
    images, _ = load_sklearn_digits()
    imgs = canvases(dm, "train")
    sources, shifts = dm.source_indices["train"], dm.displacements["train"]
    assert (shifts >= dm.offset - dm.jitter).all() and (shifts <= dm.offset + dm.jitter).all()
    for i in range(len(imgs)):
        left, right = images[sources[i, 0]], images[sources[i, 1]]
        dr, dc = shifts[i]
        img = imgs[i]
        # rows above / columns left of the right digit hold the left digit alone
        np.testing.assert_allclose(img[:dr, :8], left[:dr, :], atol=1e-5)
        np.testing.assert_allclose(img[:8, :dc], left[:, :dc], atol=1e-5)
        # rows below / columns right of the left digit hold the right digit alone
        np.testing.assert_allclose(img[8 : dr + 8, dc : dc + 8], right[8 - dr :, :], atol=1e-5)
        np.testing.assert_allclose(img[dr : dr + 8, 8 : dc + 8], right[:, 8 - dc :], atol=1e-5)
        # the overlap is the pixel-wise maximum; nothing lies outside the two digits
        expected = np.zeros_like(img)
        expected[:8, :8] = left
        expected[dr : dr + 8, dc : dc + 8] = np.maximum(expected[dr : dr + 8, dc : dc + 8], right)
        np.testing.assert_allclose(img, expected, atol=1e-5)


def test_left_digit_really_is_upper_left_on_a_sample():
    dm = small(num_train=50)
    images, _ = load_sklearn_digits()
    img = canvases(dm, "train")[0]
    left, right = (images[j] for j in dm.source_indices["train"][0])
    d = dm.offset
    corner = img[:d, :d]
    assert np.allclose(corner, left[:d, :d], atol=1e-5)
    # the top-left corner is not taken from the right digit, which starts at (d, d)
    assert dm.displacements["train"][0].min() >= 1


def test_digits_overlap_over_most_of_their_area():
    dm = small()
    assert dm.nominal_overlap > 0.5
    for split in SPLITS:
        shifts = dm.displacements[split]
        overlap = (8 - shifts[:, 0]) * (8 - shifts[:, 1]) / 64
        assert overlap.min() > 0.5
        assert dm.canvas_size <= 8 + dm.offset + dm.jitter  # canvas only slightly larger than a digit


def test_unnormalized_inputs_are_in_unit_range():
    dm = small(normalize=False)
    x = dm.train_set.inputs
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


@pytest.mark.parametrize(
    "kwargs", [{"offset": 1, "jitter": 1}, {"offset": 0}, {"offset": 2, "canvas_size": 9}, {"jitter": -1}]
)
def test_invalid_layouts_are_rejected(kwargs):
    with pytest.raises(ValueError):
        MultiDigits(**kwargs)
