"""Tiny image data sets written in the real on-disk formats (CIFAR pickles, STL-10 binaries,
Tiny-ImageNet folders). Every image is filled with a grey level that encodes its label (and row), so
tests can check which image came out with which label."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def label_image(label: int, row: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``[side, side, 3]`` uint8: channel 0 holds ``label``, channel 1 holds ``row``, channel 2 is noise."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[..., 0] = label
    image[..., 1] = row
    image[..., 2] = rng.integers(0, 256, (side, side))
    return image


def write_cifar(root: Path, num_classes: int = 10, per_file: int = 6, test: int = 8, seed: int = 0) -> dict[str, list]:
    """CIFAR-10 (5 train batches + test_batch) or CIFAR-100 (train + test) pickles under ``root``."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels"
        test_file = "test_batch"
    else:
        folder, files, key = root / "cifar-100-python", ["train"], "fine_labels"
        test_file = "test"
        per_file *= 5
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list] = {"train": [], "test": []}
    row = 0
    for name, count, split in [(f, per_file, "train") for f in files] + [(test_file, test, "test")]:
        labels = rng.integers(0, num_classes, count).tolist()
        images = [label_image(y, row + i, 32, rng) for i, y in enumerate(labels)]
        row += count
        data = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])  # R plane, G plane, B plane
        entry = {"data": data, key: labels, "batch_label": name}
        if num_classes == 100:
            entry["coarse_labels"] = [y // 5 for y in labels]
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
        written[split] += list(zip(images, labels))
    return written


def write_stl10(root: Path, train: int = 10, test: int = 6, unlabeled: int = 4, seed: int = 0) -> dict[str, list]:
    """``stl10_binary/{train,test}_{X,y}.bin`` and ``unlabeled_X.bin`` (column-major planes, labels 1..10)."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list] = {}
    for split, count in (("train", train), ("test", test), ("unlabeled", unlabeled)):
        labels = rng.integers(0, 10, count).tolist()
        images = [label_image(y, i, 96, rng) for i, y in enumerate(labels)]
        # each plane is stored column by column: write the transposed CHW array in C order
        raw = np.stack([im.transpose(2, 1, 0) for im in images]) if images else np.zeros((0, 3, 96, 96), np.uint8)
        raw.astype(np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.asarray(labels, dtype=np.uint8) + 1).tofile(folder / f"{split}_y.bin")
        written[split] = list(zip(images, labels))
    return written


def write_tiny_imagenet(root: Path, per_class: int = 1, val_classes: int = 6, seed: int = 0) -> dict[str, list]:
    """``tiny-imagenet-200`` with 200 class folders of ``per_class`` JPEGs and a small val split.

    Grey levels survive JPEG only approximately, so the label is written as a coarse level (label % 8 * 32)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{index:08d}" for index in range(200)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    written: dict[str, list] = {"train": [], "test": []}

    def image(label: int) -> np.ndarray:
        return np.full((64, 64, 3), (label % 8) * 32, dtype=np.uint8)

    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            pixels = image(label)
            Image.fromarray(pixels).save(images / f"{wnid}_{i}.JPEG")
            written["train"].append((pixels, label))
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for i, label in enumerate(rng.integers(0, 200, val_classes).tolist()):
        name = f"val_{i}.JPEG"
        pixels = image(label)
        if i == 0:  # one greyscale file, as in the real data set
            Image.fromarray(pixels[..., 0]).save(folder / "val" / "images" / name)
        else:
            Image.fromarray(pixels).save(folder / "val" / "images" / name)
        lines.append(f"{name}\t{wnids[label]}\t0\t0\t63\t63")
        written["test"].append((pixels, label))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return written
