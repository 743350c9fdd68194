"""SpuriousDigits: the planted pixel names the label in training as often as asked, a random class in the
test split (or nothing, clean), and leaves every other pixel as Digits has it."""

from __future__ import annotations

import pytest
import torch

from lightning_mtl.datamodules import Digits, SpuriousDigits
from lightning_mtl.datamodules.spurious_digits import SPURIOUS_PIXELS


def _built(module):
    module.setup("fit")
    return module


def _planted(x: torch.Tensor, value: float) -> torch.Tensor:
    """Which class pixels hold the planted value, [N, 10]."""
    return torch.stack([x[:, 0, r, c] == value for r, c in SPURIOUS_PIXELS], dim=1)


@pytest.mark.parametrize("correlation", [1.0, 0.8])
def test_the_pixel_names_the_label_in_training_and_a_random_class_at_test(correlation):
    data = _built(SpuriousDigits(correlation=correlation, seed=3, as_dict=False))
    plain = _built(Digits(seed=3, as_dict=False))
    value = (1.0 - data.mean) / data.std
    for split in ("train", "val", "test"):
        got, ref = getattr(data, f"{split}_set"), getattr(plain, f"{split}_set")
        names, labels = data.spurious[split], got.targets
        assert torch.equal(labels, ref.targets)
        rows = torch.arange(len(names))
        r, c = torch.tensor(SPURIOUS_PIXELS).T
        assert (got.inputs[rows, 0, r[names], c[names]] == value).all(), "the named pixel is planted"
        untouched = got.inputs.clone()
        untouched[rows, 0, r[names], c[names]] = ref.inputs[rows, 0, r[names], c[names]]
        assert torch.equal(untouched, ref.inputs), "only the named pixel changes"
        agree = (names == labels).float().mean().item()
        if split == "test":
            assert agree < 0.2  # uniform over 10 classes: about 0.1
        elif correlation == 1.0:
            assert agree == 1.0
        else:  # 0.8 + 0.2 / 10 expected, a few hundred samples
            assert 0.72 < agree < 0.9
    assert _planted(data.train_set.inputs, value).any(dim=1).all()


def test_the_clean_test_split_has_no_pixel_and_the_same_training_data():
    clean = _built(SpuriousDigits(test_mode="clean", seed=1))
    noisy = _built(SpuriousDigits(test_mode="random", seed=1))
    plain = _built(Digits(seed=1))
    assert torch.equal(clean.test_set.inputs, plain.test_set.inputs)
    assert torch.equal(clean.train_set.inputs, noisy.train_set.inputs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="correlation"):
        SpuriousDigits(correlation=1.5)
    with pytest.raises(ValueError, match="test_mode"):
        SpuriousDigits(test_mode="ood")
    with pytest.raises(ValueError, match="no transforms"):
        SpuriousDigits(train_transform=lambda x: x)
