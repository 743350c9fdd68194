"""ImageNet-R read from a tiny fixture in the official archive layout (imagenet-r/<wnid>/*.jpg)."""

from __future__ import annotations

import pytest
import torch
from torchvision.datasets import ImageFolder

from lightning_mtl.datamodules._images import DataLayoutError
from lightning_mtl.datamodules.imagenet_r import ImageNetR
from tests.fixtures.imagenet_r import grey_level, write_imagenet_r
from tests.fixtures.trainers import one_thread  # noqa: F401


def _raw(root, **kwargs) -> ImageNetR:
    dm = ImageNetR(str(root), normalize=False, train_transform=_keep, eval_transform=_keep, **kwargs)
    dm.setup("fit")
    return dm


def _keep(image):
    return image


def test_split_matches_the_official_imagefolder_permutation(tmp_path):
    folder = write_imagenet_r(tmp_path)
    dm = _raw(tmp_path)
    # reference: the official code permutes torchvision's ImageFolder list with randperm(seed 0), first 80% train
    reference = ImageFolder(str(folder)).samples
    perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))
    cut = int(len(reference) * 0.8)
    expected = {
        "train": [reference[i] for i in perm[:cut].sort().values.tolist()],
        "test": [reference[i] for i in perm[cut:].sort().values.tolist()],
    }
    for split, dataset in (("train", dm.train_set), ("test", dm.test_set)):
        got = [(dataset.arrays.images[int(i)], int(dataset.arrays.labels[int(i)])) for i in dataset.indices]
        assert got == expected[split]
    assert len(expected["train"]) + len(expected["test"]) == 300 and len(expected["train"]) == 240
    # another split seed gives another split of the same files
    other = _raw(tmp_path, split_seed=1)
    assert set(other.train_set.arrays.images) != set(dm.train_set.arrays.images)
    assert set(other.train_set.arrays.images) | set(other.test_set.arrays.images) == {p for p, _ in reference}


def test_pixels_labels_and_greyscale_decode(tmp_path):
    write_imagenet_r(tmp_path)
    dm = _raw(tmp_path / "imagenet-r", val_size=10)  # root may be the imagenet-r folder itself
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        for index in range(len(dataset)):
            image, label = dataset[index]
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert abs(float(image.float().mean()) - grey_level(int(label))) < 3
    assert len(dm.val_set) == 10 and len(dm.train_set) == 230
    assert dm.num_classes == 200 and dm.input_shape == (3, 224, 224)


def test_default_transforms_give_normalized_224_crops(tmp_path):
    write_imagenet_r(tmp_path)
    dm = ImageNetR(str(tmp_path), batch_size=6, seed=0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.long
    xt, yt = next(iter(dm.test_dataloader()))
    mean, std = torch.tensor(dm.mean).view(1, 3), torch.tensor(dm.std).view(1, 3)
    # flat images: the centre crop of the resized image is (level / 255 - mean) / std everywhere
    levels = torch.tensor([grey_level(int(label)) for label in yt], dtype=torch.float32).view(-1, 1) / 255
    assert torch.allclose(xt[:, :, 112, 112], (levels - mean) / std, atol=0.05)


def test_missing_or_wrong_layout_raises_a_layout_error(tmp_path):
    with pytest.raises(DataLayoutError, match="imagenet-r"):
        ImageNetR(str(tmp_path)).setup()
    write_imagenet_r(tmp_path, num_classes=5)
    with pytest.raises(DataLayoutError, match="5 class folders"):
        ImageNetR(str(tmp_path)).setup()


def test_empty_class_folder_raises(tmp_path):
    folder = write_imagenet_r(tmp_path)
    for image in next(p for p in sorted(folder.iterdir()) if p.is_dir()).iterdir():
        image.unlink()
    with pytest.raises(DataLayoutError, match="holds no images"):
        ImageNetR(str(tmp_path)).setup()


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="train_fraction"):
        ImageNetR(str(tmp_path), train_fraction=1.0)
