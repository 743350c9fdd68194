"""Multi-MNIST family generated from torchvision raw IDX fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_mtl.datamodules import multimnist
from lightning_mtl.datamodules.multimnist import MultiMNIST, read_idx
from tests.fixtures.mnist import write_mnist_raw


def _find_pairs(images: np.ndarray, left_src: np.ndarray, right_src: np.ndarray) -> list[tuple[int, int]]:
    """Recover which source images make up each generated 36x36 sample, by brute force."""
    pairs = []
    for sample in images:
        found = [(i, j) for i in range(len(left_src)) for j in range(len(right_src))
                 if np.array_equal(sample, multimnist.overlay(left_src[i : i + 1], right_src[j : j + 1])[0])]  # fmt: skip
        assert len(found) >= 1
        pairs.append(found[0])
    return pairs


def test_overlay_places_the_right_image_8_pixels_down_right_and_takes_the_maximum():
    left, right = np.zeros((1, 28, 28), np.uint8), np.zeros((1, 28, 28), np.uint8)
    left[0, 10, 10], left[0, 20, 20] = 50, 50
    right[0, 2, 2], right[0, 12, 12] = 90, 30  # lands on (10, 10) and (20, 20)
    canvas = multimnist.overlay(left, right)[0]
    assert canvas.shape == (36, 36)
    assert canvas[10, 10] == 90 and canvas[20, 20] == 50 and canvas.sum() == 140


def test_samples_are_two_source_images_with_their_labels(tmp_path):
    src = write_mnist_raw(tmp_path, n_train=8, n_test=5)
    dm = MultiMNIST(tmp_path, pairs_per_image=2, val_fraction=0.25, batch_size=4, seed=3)
    assert dm.task_names == ("left", "right") and dm.input_shape == (1, 36, 36)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 16 and len(dm.val_set) == 4 and len(dm.test_set) == 10
    images, labels = src["test"]
    x = (dm.test_set.inputs[:, 0] * 255).round().to(torch.uint8).numpy()
    for (i, j), y_left, y_right in zip(_find_pairs(x, images, images), dm.test_set.targets["left"],
                                       dm.test_set.targets["right"]):  # fmt: skip
        assert i != j and y_left == labels[i] and y_right == labels[j]
    # every test image is the left image of exactly pairs_per_image samples
    assert sorted(i for i, _ in _find_pairs(x, images, images)) == sorted(list(range(5)) * 2)
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (4, 1, 36, 36) and batch_y["left"].dtype == torch.long


def test_generation_is_deterministic_and_cached(tmp_path, monkeypatch):
    write_mnist_raw(tmp_path)
    first = MultiMNIST(tmp_path, seed=1)
    first.setup()
    assert list((tmp_path / "multi_mnist_cache").glob("*.npz"))

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(MultiMNIST, "_generate", fail)
    second = MultiMNIST(tmp_path, seed=1)
    second.setup()
    torch.testing.assert_close(first.train_set.inputs, second.train_set.inputs)
    torch.testing.assert_close(first.val_set.targets["right"], second.val_set.targets["right"])
    monkeypatch.undo()
    other = MultiMNIST(tmp_path, seed=2, cache_dir=str(tmp_path / "elsewhere"))
    other.setup()
    assert not torch.equal(first.test_set.inputs, other.test_set.inputs)


def test_fashion_mnist_variant_28_pixels_and_gzip(tmp_path):
    mnist = write_mnist_raw(tmp_path, "MNIST", n_train=6, n_test=4, seed=0, compress=True)
    fashion = write_mnist_raw(tmp_path, "FashionMNIST", n_train=6, n_test=4, seed=1)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte")), mnist["test"][0])
    dm = MultiMNIST(tmp_path, variant="fashion_mnist", image_size=36, pairs_per_image=1, val_fraction=0.0)
    dm.setup()
    x = (dm.test_set.inputs[:, 0] * 255).round().to(torch.uint8).numpy()
    for (i, j), yl, yr in zip(_find_pairs(x, mnist["test"][0], fashion["test"][0]), dm.test_set.targets["left"],
                              dm.test_set.targets["right"]):  # fmt: skip
        assert yl == mnist["test"][1][i] and yr == fashion["test"][1][j]
    small = MultiMNIST(tmp_path, variant="fashion_mnist", image_size=28, pairs_per_image=1, val_fraction=0.0)
    small.setup()
    assert small.test_set.inputs.shape == (4, 1, 28, 28)
    # nearest resizing of the same canvases: every pixel value is one of the canvas's values
    assert set(small.test_set.inputs.unique().tolist()) <= set(dm.test_set.inputs.unique().tolist())


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/train-images-idx3-ubyte.*torchvision.datasets.MNIST"):
        MultiMNIST(tmp_path).setup()
    write_mnist_raw(tmp_path)
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        MultiMNIST(tmp_path, variant="fashion").setup()
    with pytest.raises(ValueError, match="variant"):
        MultiMNIST(tmp_path, variant="kmnist")
    with pytest.raises(ValueError, match="28 or 36"):
        MultiMNIST(tmp_path, image_size=32)


def test_an_unreadable_cache_is_generated_again(tmp_path):
    write_mnist_raw(tmp_path)
    first = MultiMNIST(tmp_path, seed=1)
    first.setup()
    (cache,) = (tmp_path / "multi_mnist_cache").glob("*.npz")
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # an interrupted copy, say
    again = MultiMNIST(tmp_path, seed=1)
    again.setup()
    assert torch.equal(again.train_set.inputs, first.train_set.inputs)
    assert torch.equal(again.test_set.targets["right"], first.test_set.targets["right"])
    assert cache.read_bytes() == data  # and written back whole
