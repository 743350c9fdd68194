"""Multi-MNIST, Multi-Fashion and Multi-(Fashion+MNIST), generated from the torchvision raw files."""

from __future__ import annotations

import gzip
import hashlib
import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from lightning_mtl.datamodules._common import TensorMultiTaskDataset, _LeftRightDigits, check_data_path, read_npz

__all__ = ["MultiMNIST", "read_idx"]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# variant -> (source of the left image, source of the right image), torchvision folder names
_VARIANTS = {
    "mnist": ("MNIST", "MNIST"),
    "fashion": ("FashionMNIST", "FashionMNIST"),
    "fashion_mnist": ("MNIST", "FashionMNIST"),
}
_SHIFT = 8  # the right image starts 8 pixels down and right of the left one, on a 36x36 canvas
_CANVAS = 28 + _SHIFT


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``path`` or ``path + '.gz'``) into a uint8 array."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path = path + ".gz"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but the file holds {array.size} values")
    return array.reshape(shape)


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Put ``left`` ([N, 28, 28]) in the upper left and ``right`` 8 pixels down-right of it on a 36x36
    canvas; where they overlap the brighter pixel wins (Sener & Koltun's construction)."""
    canvas = np.zeros((len(left), _CANVAS, _CANVAS), dtype=np.uint8)
    canvas[:, :28, :28] = left
    region = canvas[:, _SHIFT:, _SHIFT:]
    np.maximum(region, right, out=region)
    return canvas


class MultiMNIST(_LeftRightDigits):
    """Two overlaid 28x28 images per sample; tasks ``left`` and ``right`` (10 classes each).

    Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, built Multi-MNIST;
    Lin, Zhen, Li, Zhang and Kwong, "Pareto Multi-Task Learning", NeurIPS 2019, added Multi-Fashion and
    Multi-(Fashion+MNIST) (left an MNIST digit, right a Fashion-MNIST item); F-MTL (Phan et al., 2022)
    evaluates on all three.

    Construction (our own generator, deterministic in ``seed``): for every source image (the left one)
    a right partner is drawn at random from the same split; the left image sits in the upper left of a
    36x36 canvas, the right one 8 pixels further down and right, overlapping pixels take the maximum.
    ``image_size=36`` keeps the canvas (the Pareto-MTL convention of the published 36x36 pickles);
    ``image_size=28`` resizes it with nearest-neighbour sampling (Sener & Koltun). ``pairs_per_image=2``
    draws two partners per left image (120,000 training pairs, as the Pareto-MTL files hold); 1 gives
    Sener & Koltun's 60,000. A share ``val_fraction`` of the training pairs (whole left-image groups,
    seeded) is held out for validation; the test pairs come from the 10,000 test images.

    The generated arrays are cached in ``cache_dir`` (default ``<root>/multi_mnist_cache``) keyed by all
    generation settings and checked by a hash; an unwritable cache folder only skips caching.

    Expected files (the torchvision layout; ``torchvision.datasets.MNIST(root, download=True)`` and
    ``FashionMNIST`` write it; ``.gz`` files are read as well)::

        root/MNIST/raw/train-images-idx3-ubyte         train-labels-idx1-ubyte
        root/MNIST/raw/t10k-images-idx3-ubyte          t10k-labels-idx1-ubyte
        root/FashionMNIST/raw/...                      the same four files

    Batches: ``(x [B, 1, S, S] in [0, 1] (standardized if normalize), {"left": long [B], "right": long [B]})``.

    Args:
        root: the folder holding ``MNIST/`` and/or ``FashionMNIST/``.
        variant: ``"mnist"``, ``"fashion"`` or ``"fashion_mnist"``.
        image_size: 36 (canvas) or 28 (resized).
        pairs_per_image: right partners drawn per left image.
        val_fraction: share of training pairs held out for validation.
        normalize: standardize with the training split's mean and std.
        cache_dir: where to cache the generated arrays (``None``: ``<root>/multi_mnist_cache``).
        batch_size: samples per batch (256 in F-MTL).
        num_workers: DataLoader workers.
        seed: seed of the pairing, the split and the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        root: str,
        variant: Literal["mnist", "fashion", "fashion_mnist"] = "mnist",
        image_size: Literal[28, 36] = 36,
        pairs_per_image: int = 2,
        val_fraction: float = 0.1,
        normalize: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if variant not in _VARIANTS:
            raise ValueError(f"MultiMNIST variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
        if image_size not in (28, 36):
            raise ValueError(f"MultiMNIST image_size must be 28 or 36, got {image_size}")
        if pairs_per_image < 1:
            raise ValueError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.root = os.fspath(root)
        self.variant = variant
        self.image_size = int(image_size)
        self.pairs_per_image = int(pairs_per_image)
        self.val_fraction = float(val_fraction)
        self.normalize = bool(normalize)
        self.cache_dir = cache_dir if cache_dir is not None else os.path.join(self.root, "multi_mnist_cache")
        self.mean: float | None = None
        self.std: float | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    # -- generation -----------------------------------------------------------------------------
    def _source(self, folder: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        raw = os.path.join(self.root, folder, "raw")
        images, labels = (os.path.join(raw, name) for name in _FILES[split])
        hint = (
            f"expected the torchvision raw files {folder}/raw/{_FILES[split][0]} and {_FILES[split][1]} (or .gz) under "
            f"the root; get them with torchvision.datasets.{folder}(root, download=True) on a machine with internet"
        )
        for path in (images, labels):
            if not os.path.exists(path + ".gz"):
                check_data_path(path, f"MultiMNIST ({self.variant})", hint)
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) != len(y):
            raise ValueError(f"{images}: expected [N, 28, 28] images with N labels, got {x.shape} and {y.shape}")
        return x, y

    def _generate(self, split: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        left_folder, right_folder = _VARIANTS[self.variant]
        x_left, y_left = self._source(left_folder, split)
        x_right, y_right = (x_left, y_left) if right_folder == left_folder else self._source(right_folder, split)
        n = len(x_left)
        left = np.repeat(np.arange(n), self.pairs_per_image)
        right = rng.integers(0, len(x_right), size=len(left))
        if right_folder == left_folder:  # a partner is a different image
            same = right == left
            right[same] = (right[same] + 1 + rng.integers(0, len(x_right) - 1, size=int(same.sum()))) % len(x_right)
        images = overlay(x_left[left], x_right[right])
        if self.image_size == 28:
            images = (
                F.interpolate(torch.from_numpy(images)[:, None].float(), size=(28, 28), mode="nearest")[:, 0]
                .to(torch.uint8)
                .numpy()
            )
        labels = np.stack([y_left[left], y_right[right]], axis=1).astype(np.int64)
        return images, labels, left

    def _cache_path(self) -> str:
        key = f"{self.variant}-{self.image_size}-{self.pairs_per_image}-{self.seed}-v1"
        return os.path.join(self.cache_dir, f"multi_{key}.npz")

    def _arrays(self) -> dict[str, np.ndarray]:
        path = self._cache_path()
        if os.path.exists(path):
            try:
                arrays, _ = read_npz(path)
            except ValueError:
                arrays = {}  # an unreadable cache (truncated, say) is generated again
            digest = arrays.pop("digest", None)
            if digest is not None and digest.item() == _digest(arrays):
                return arrays
        rng = np.random.default_rng(self.seed)
        train_x, train_y, train_group = self._generate("train", rng)
        test_x, test_y, _ = self._generate("test", rng)
        arrays = {
            "train_x": train_x,
            "train_y": train_y,
            "train_group": train_group,
            "test_x": test_x,
            "test_y": test_y,
        }
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = path + f".{os.getpid()}.tmp.npz"
            np.savez(tmp, digest=np.array(_digest(arrays)), **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as its allow_pickle flag; the keys are array names
            os.replace(tmp, path)  # atomic: concurrent DDP ranks never read a half-written cache
        except OSError:
            pass
        return arrays

    def _build(self) -> None:
        arrays = self._arrays()
        # hold out whole left-image groups, so no left image appears in both train and val
        groups = arrays["train_group"]
        rng = np.random.default_rng(self.seed + 1)
        n_groups = int(groups.max()) + 1
        val_groups = rng.permutation(n_groups)[: int(round(self.val_fraction * n_groups))]
        is_val = np.isin(groups, val_groups)
        x = torch.from_numpy(arrays["train_x"]).float().div_(255.0)[:, None]
        test_x = torch.from_numpy(arrays["test_x"]).float().div_(255.0)[:, None]
        train_x, val_x = x[torch.from_numpy(~is_val)], x[torch.from_numpy(is_val)]
        if self.normalize:
            self.mean, self.std = float(train_x.mean()), float(train_x.std())
            train_x, val_x, test_x = ((t - self.mean) / self.std for t in (train_x, val_x, test_x))
        y = torch.from_numpy(arrays["train_y"])
        test_y = torch.from_numpy(arrays["test_y"])

        def targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"left": labels[:, 0].contiguous(), "right": labels[:, 1].contiguous()}

        self.train_set = TensorMultiTaskDataset(train_x, targets(y[torch.from_numpy(~is_val)]))
        self.val_set = TensorMultiTaskDataset(val_x, targets(y[torch.from_numpy(is_val)]))
        self.test_set = TensorMultiTaskDataset(test_x, targets(test_y))


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()
