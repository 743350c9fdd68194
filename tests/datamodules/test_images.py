"""CIFAR-10/100, STL-10 and Tiny-ImageNet read from tiny fixtures in their real on-disk formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_mtl.architectures.resnet_cifar import PreActResNet18, ResNet18
from lightning_mtl.datamodules._images import DataLayoutError
from lightning_mtl.datamodules.cifar import CIFAR10, CIFAR100
from lightning_mtl.datamodules.stl10 import STL10
from lightning_mtl.datamodules.tiny_imagenet import TinyImageNet
from tests.fixtures.cifar import write_cifar
from tests.fixtures.stl10 import write_stl10
from tests.fixtures.tiny_imagenet import write_tiny_imagenet


def _raw(dm_class, root, **kwargs):
    """A data module whose transforms return the uint8 image untouched."""
    dm = dm_class(str(root), normalize=False, train_transform=lambda im: im, eval_transform=lambda im: im, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pixels_and_labels_round_trip(tmp_path, num_classes):
    written = write_cifar(tmp_path, num_classes)
    dm = _raw(CIFAR10 if num_classes == 10 else CIFAR100, tmp_path, batch_size=4)
    for split, dataset in (("train", dm.train_set), ("test", dm.test_set)):
        assert len(dataset) == len(written[split])
        for i, (image, label) in enumerate(written[split]):
            x, y = dataset[i]
            assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1)) and int(y) == label
    assert dm.num_classes == num_classes and dm.input_shape == (3, 32, 32)


def test_cifar_default_transforms_batches_and_normalization(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10(str(tmp_path), batch_size=5, val_size=4, seed=1)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long and y.shape == (5,)
    xv, yv = next(iter(dm.val_dataloader()))
    # the eval transform is exactly (pixel / 255 - mean) / std: channel 0 holds the label
    mean, std = dm.mean[0], dm.std[0]
    assert torch.allclose(xv[:, 0, 0, 0], (yv.float() / 255 - mean) / std, atol=1e-6)


def test_random_crop_with_padding_and_flip_are_the_default_augmentation(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10(str(tmp_path), normalize=False)
    dm.setup("fit")
    torch.manual_seed(0)
    views = torch.stack([dm.train_set[0][0] for _ in range(30)])
    clean = torch.from_numpy(dm.train_set.arrays.images[0]).permute(2, 0, 1).float() / 255
    assert not all(torch.equal(v, clean) for v in views)  # augmented
    zero_border = (views[:, 0] == 0).flatten(1).any(1)  # zero padding shows up after a shifted crop
    assert zero_border.any()
    # every view's channel 0 is the label (or padding): the crop never mixes in another image
    assert set(torch.unique(views[:, 0] * 255).round().tolist()) <= {0.0, float(dm.train_set.arrays.labels[0])}


def test_val_split_is_seeded_disjoint_and_zero_means_test(tmp_path):
    write_cifar(tmp_path)
    a, b, c = (_raw(CIFAR10, tmp_path, val_size=7, seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.split_indices["val"], b.split_indices["val"])
    assert not np.array_equal(a.split_indices["val"], c.split_indices["val"])
    assert len(a.val_set) == 7 and len(a.train_set) == 30 - 7
    assert not set(a.split_indices["val"]) & set(a.split_indices["train"])
    zero = _raw(CIFAR10, tmp_path, val_size=0)
    assert zero.val_set is zero.test_set and len(zero.train_set) == 30
    with pytest.raises(ValueError, match="val_size=30 leaves no training image"):
        _raw(CIFAR10, tmp_path, val_size=30)


def test_custom_two_view_transform_and_dict_labels(tmp_path):
    write_cifar(tmp_path)

    def two_views(image):
        image = image.float()
        return image, image.flip(-1)

    dm = CIFAR10(str(tmp_path), train_transform=two_views, batch_size=3, as_dict=True, task_name="cls")
    dm.setup("fit")
    (v1, v2), y = next(iter(dm.train_dataloader()))
    assert v1.shape == v2.shape == (3, 3, 32, 32) and torch.equal(v1.flip(-1), v2)
    assert set(y) == {"cls"} and dm.task_names == ("cls",)


def test_missing_and_malformed_data_are_clear_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="cifar-100-python/train.*\n.*cifar-100-python.tar.gz"):
        CIFAR100(str(tmp_path / "nowhere")).setup()
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataLayoutError, match="data_batch_3' is not a CIFAR python pickle"):
        CIFAR10(str(tmp_path)).setup()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataLayoutError, match="data_batch_3' is missing"):
        CIFAR10(str(tmp_path)).setup()
    with pytest.raises(DataLayoutError, match="stl10_binary.*\n.*stl10_binary.tar.gz"):
        STL10(str(tmp_path)).setup()
    with pytest.raises(DataLayoutError, match="tiny-imagenet-200.zip"):
        TinyImageNet(str(tmp_path)).setup()


def test_root_may_be_the_data_folder_itself(tmp_path):
    written = write_cifar(tmp_path, 100)
    dm = _raw(CIFAR100, tmp_path / "cifar-100-python")
    assert len(dm.train_set) == len(written["train"])


def test_stl10_column_major_planes_labels_and_unlabeled(tmp_path):
    written = write_stl10(tmp_path)
    dm = _raw(STL10, tmp_path, val_size=2)
    rows = dm.split_indices["train"]
    for i, row in enumerate(rows):
        image, label = written["train"][row]
        x, y = dm.train_set[i]
        assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1)) and int(y) == label
    with_unlabeled = _raw(STL10, tmp_path, val_size=2, unlabeled=True)
    labels = with_unlabeled.train_set.labels
    assert len(labels) == 10 - 2 + 4 and (labels == -1).sum() == 4
    assert set(with_unlabeled.split_indices["val"]) <= set(range(10))  # never an unlabelled image
    x, _ = with_unlabeled.train_set[len(labels) - 1]
    assert torch.equal(x, torch.from_numpy(written["unlabeled"][-1][0]).permute(2, 0, 1))
    default = STL10(str(tmp_path), batch_size=4)
    default.setup()
    assert next(iter(default.train_dataloader()))[0].shape == (4, 3, 96, 96)


def test_tiny_imagenet_folders_labels_and_greyscale(tmp_path):
    written = write_tiny_imagenet(tmp_path)
    dm = _raw(TinyImageNet, tmp_path, val_size=20)
    assert len(dm.train_set) == 180 and len(dm.val_set) == 20 and len(dm.test_set) == len(written["test"])
    for dataset in (dm.train_set, dm.test_set):
        for i in range(len(dataset)):
            x, y = dataset[i]
            assert x.shape == (3, 64, 64)
            assert abs(float(x.float().mean()) - (int(y) % 8) * 32) < 3  # JPEG is close, not exact
    default = TinyImageNet(str(tmp_path), batch_size=4)
    default.setup()
    assert next(iter(default.train_dataloader()))[0].shape == (4, 3, 64, 64)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("n1\nn2\n")
    with pytest.raises(DataLayoutError, match="lists 2 classes"):
        TinyImageNet(str(tmp_path)).setup()


@pytest.mark.parametrize("cls", [ResNet18, PreActResNet18])
def test_cifar_backbones_shapes_and_parameter_count(cls):
    model = cls()
    stages = model.forward_stages(torch.zeros(2, 3, 32, 32))
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 512) and model.out_features == 512
    # the common CIFAR ResNet-18 has 11,173,962 parameters with its 10-class classifier (5,130 of them), the
    # common PreAct-ResNet-18 11,171,146; ours adds the paper's final BN-ReLU after the last block (2 x 512)
    params = sum(p.numel() for p in model.parameters())
    assert params + 5130 == {ResNet18: 11_173_962, PreActResNet18: 11_171_146 + 1024}[cls]
