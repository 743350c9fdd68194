"""Tiny data sets written in the real on-disk formats of the multi-task benchmarks."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()


def _unit_normals(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    v = rng.normal(size=(*shape, 3)).astype(np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_dense(root: Path, label_dir: str, classes: int, with_normals: bool, n_train: int = 3, n_val: int = 2,
                size: tuple[int, int] = (12, 16), seed: int = 0) -> dict:  # fmt: skip
    """The MTAN / LibMTL .npy layout; returns the arrays written, ``{split: {modality: [arrays]}}``."""
    rng = np.random.default_rng(seed)
    written: dict = {}
    for split, n in (("train", n_train), ("val", n_val)):
        written[split] = {"image": [], label_dir: [], "depth": [], "normal": []}
        for sub in ("image", label_dir, "depth", *(["normal"] if with_normals else [])):
            os.makedirs(root / split / sub, exist_ok=True)
        for i in range(n):
            image = rng.random((*size, 3)).astype(np.float32)
            label = rng.integers(-1, classes, size=size).astype(np.float32)  # -1 = void, stored as float
            depth = rng.uniform(0.5, 5.0, size=(*size, 1)).astype(np.float32)
            depth[0, :3] = 0.0  # no reading
            arrays = {"image": image, label_dir: label, "depth": depth}
            if with_normals:
                normal = _unit_normals(rng, size)
                normal[1, :2] = 0.0
                arrays["normal"] = normal
            for sub, array in arrays.items():
                np.save(root / split / sub / f"{i}.npy", array)
                written[split][sub].append(array)
    return written


def write_nyuv2(root: Path, **kwargs) -> dict:
    return write_dense(root, "label", 13, True, **kwargs)


def write_cityscapes(root: Path, **kwargs) -> dict:
    return write_dense(root, "label_7", 7, False, **kwargs)


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist_raw(root: Path, folder: str = "MNIST", n_train: int = 12, n_test: int = 6, seed: int = 0,
                    compress: bool = False) -> dict:  # fmt: skip
    """torchvision's ``<folder>/raw`` IDX files; image ``i`` is filled with value ``10 + i`` in a label-dependent
    block, so tests can tell which source images were combined."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        labels = (np.arange(n) + rng.integers(0, 10)) % 10
        images = rng.integers(0, 100, size=(n, 28, 28)).astype(np.uint8)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), compress)
        out[split] = (images, labels)
    return out


def write_celeba(root: Path, n: int = 9, size: int = 10, seed: int = 0) -> np.ndarray:
    """torchvision's CelebA layout with ``n`` JPEGs, the 40 attributes (-1 / 1) and a 0 / 1 / 2 partition that
    puts image ``i`` into split ``i % 3``; returns the attribute array."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    values = rng.choice([-1, 1], size=(n, 40))
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    partition = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size + 3, size, 3), dtype=np.uint8)).save(folder / "img_align_celeba" / name)
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values[i]))
        partition.append(f"{name} {i % 3}")
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    return values


def write_table(path: Path, n: int = 40, seed: int = 0) -> dict:
    """A CSV with features ``f1``, ``f2``, a class target ``kind`` (strings), an integer target ``level`` and a
    float target ``score``; a few empty cells."""
    rng = np.random.default_rng(seed)
    f1, f2 = rng.normal(size=n), rng.normal(size=n)
    kind = np.where(f1 > 0, "cat", "dog")
    level = (f2 > 0).astype(int) + (f1 > 1).astype(int)
    score = f1 * 2 + f2
    rows = ["f1,f2,kind,level,score"]
    for i in range(n):
        cells = [f"{f1[i]:.6f}", f"{f2[i]:.6f}", kind[i], str(level[i]), f"{score[i]:.6f}"]
        if i == 3:
            cells[2] = ""  # missing class label
        if i == 4:
            cells[4] = ""  # missing regression target
        if i == 5:
            cells[1] = ""  # missing feature
        rows.append(",".join(cells))
    path.write_text("\n".join(rows) + "\n")
    return {"f1": f1, "f2": f2, "kind": kind, "level": level, "score": score}
