"""Tiny data sets in the real on-disk layouts (what torchvision's datasets and the official archives hold)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_file: int = 4, test: int = 8, seed: int = 0) -> Path:
    """``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (python pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_file
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_file, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


def write_cifar100(root: Path, train: int = 20, test: int = 8, seed: int = 0) -> Path:
    """``cifar-100-python/{train, test, meta}`` (python pickles, fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": rng.integers(0, 100, n).tolist(),
                 "coarse_labels": rng.integers(0, 20, n).tolist(), "filenames": [f"{name}_{i}.png" for i in range(n)]}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return root


def write_stl10(root: Path, train: int = 20, test: int = 8, unlabeled: int = 8, seed: int = 0) -> Path:
    """``stl10_binary/{train,test}_{X,y}.bin`` and ``unlabeled_X.bin`` (uint8 3x96x96, labels 1..10)."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        rng.integers(1, 11, n, dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    rng.integers(0, 256, (unlabeled, 3, 96, 96), dtype=np.uint8).tofile(folder / "unlabeled_X.bin")
    return root


def write_tiny_imagenet(root: Path, val: int = 8, seed: int = 0) -> Path:
    """``tiny-imagenet-200`` with ``wnids.txt``, one 64x64 JPEG per class under ``train/<wnid>/images`` and
    ``val/images`` with ``val/val_annotations.txt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{wnid}_0.JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 200]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root
