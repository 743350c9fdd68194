"""MultiDigits: a small, offline Multi-MNIST-style two-task benchmark."""

from __future__ import annotations

import numpy as np
import torch

from lightning_mtl.datamodules._common import TensorMultiTaskDataset, _LeftRightDigits
from lightning_mtl.datamodules.digits import DIGIT_SIZE, _seed_streams, digit_pools, load_sklearn_digits

__all__ = ["MultiDigits"]

_SPLITS = ("train", "val", "test")


class MultiDigits(_LeftRightDigits):
    """Two overlapping handwritten digits per image; tasks ``left`` and ``right`` (10 classes each).

    A Multi-MNIST-style benchmark as in Sener & Koltun (2018), "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS (https://arxiv.org/abs/1810.04650), built from the 1,797
    8x8 handwritten digits bundled with scikit-learn (``sklearn.datasets.load_digits``), so it needs
    no download and generates in about 0.1 s (defaults).

    Layout of one sample (``canvas_size`` = ``S``, digits are 8x8)::

        (0, 0) +--------+----+
               | left   |    |      left digit: rows 0..7, columns 0..7
               |   +----+----+      right digit: rows dr..dr+7, columns dc..dc+7, with
               |   |####|    |        dr, dc drawn uniformly in [offset - jitter, offset + jitter]
               +---+----+    |      overlap (####): (8 - dr) * (8 - dc) pixels
                   |  right  |
                   +---------+ (S, S)

    The left digit sits in the upper left corner and the right digit, shifted by ``offset`` pixels
    down and to the right (plus an independent random jitter per axis), in the lower right, so the
    two overlap over most of their area, as in Multi-MNIST (which shifts 28x28 digits by 8 pixels
    on a 36x36 canvas, an overlap of (20/28)^2 = 51 %). With the defaults (``offset=2``,
    ``jitter=0``, ``S=10``) each digit overlaps the other over (6/8)^2 = 56 % of its area; with
    ``jitter=1`` the overlap varies per sample between 39 % and 77 % and the task gets harder.
    Pixels of the two digits are combined by their maximum.

    Difficulty of the defaults (measured with 20,000 training pairs, Adam 1e-3, batch 256): a
    3-conv CNN (32-64 channels) reaches about 93-95 % test accuracy per task after 3 epochs and
    95-96 % after 20; a wider CNN with batch norm about 97 %. Errors come mostly from generalizing
    to digit images never seen in training (only 1,257 training source images) and from the overlap.

    Grey levels are scaled to [0, 1]; if ``normalize`` they are then standardized with the mean and
    standard deviation of the training split (attributes :attr:`mean` / :attr:`std` after ``setup``;
    about 0.34 / 0.39 with the defaults). Batches are ``(x, {"left": y_left, "right": y_right})`` with
    ``x`` float32 ``[B, 1, S, S]`` and long labels.

    Splits: the source images are first split, seeded by ``seed``, into disjoint train / val / test
    pools (``split_fractions``, default 70 / 15 / 15 %: 1,257 / 270 / 270 images, the same pools as
    :class:`~lightning_mtl.datamodules.Digits` with the same seed), and each split's pairs are drawn
    only from its own pool (the two digits of a pair are distinct images). Every split has its own
    random stream derived from ``seed``, so changing ``num_train`` does not change val / test. After
    ``setup`` the module exposes ``pools[split]`` (source indices of the pool),
    ``source_indices[split]`` (``[N, 2]``: left and right source image of each sample) and
    ``displacements[split]`` (``[N, 2]``: row and column offset of the right digit). Source indices
    index ``load_sklearn_digits()`` / ``sklearn.datasets.load_digits()``.

    The data set has no writer ids, so a writer's digits can be in several pools.

    Args:
        num_train: number of training pairs.
        num_val: number of validation pairs.
        num_test: number of test pairs.
        offset: nominal shift, in pixels, of the right digit down and to the right (per axis).
        jitter: the shift per axis is drawn uniformly from ``offset - jitter .. offset + jitter``;
            ``offset - jitter`` must be >= 1 so the right digit is always lower right.
        canvas_size: side of the square image; ``None`` means the smallest that fits,
            ``8 + offset + jitter``. Larger canvases leave an empty border at the bottom and right.
        split_fractions: train / val / test shares of the 1,797 source images.
        normalize: standardize inputs with the training split's mean / std (else keep [0, 1]).
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        seed: seed of the pools, of the pairs and of the training order.
        pin_memory: forwarded to the DataLoaders.
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 2000,
        num_test: int = 2000,
        offset: int = 2,
        jitter: int = 0,
        canvas_size: int | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        normalize: bool = True,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        if min(num_train, num_val, num_test) < 0:
            raise ValueError(f"sample counts must be >= 0, got {num_train}, {num_val}, {num_test}")
        if jitter < 0 or offset - jitter < 1:
            raise ValueError(
                f"need jitter >= 0 and offset - jitter >= 1 (right digit strictly lower right), "
                f"got offset={offset}, jitter={jitter}"
            )
        needed = DIGIT_SIZE + offset + jitter
        if canvas_size is None:
            canvas_size = needed
        if canvas_size < needed:
            raise ValueError(f"canvas_size must be >= 8 + offset + jitter = {needed}, got {canvas_size}")
        self.num_samples = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
        self.offset = int(offset)
        self.jitter = int(jitter)
        self.canvas_size = int(canvas_size)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.normalize = bool(normalize)
        self.pools: dict[str, np.ndarray] = {}
        self.source_indices: dict[str, np.ndarray] = {}
        self.displacements: dict[str, np.ndarray] = {}
        self.mean: float = 0.0
        self.std: float = 1.0
        self.save_hyperparameters()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.canvas_size, self.canvas_size)

    @property
    def nominal_overlap(self) -> float:
        """Share of a digit's area covered by the other one at the nominal ``offset``."""
        return ((DIGIT_SIZE - self.offset) / DIGIT_SIZE) ** 2

    def _pairs(self, pool: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` ordered pairs of distinct source indices from ``pool`` and the right digits' shifts."""
        m = len(pool)
        if n and m < 2:
            raise ValueError(f"a pool of {m} source image(s) is too small to draw pairs of distinct digits")
        if n == 0:
            return np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
        first = rng.integers(0, m, size=n)
        second = (first + rng.integers(1, m, size=n)) % m  # uniform over the other pool members
        shifts = self.offset + rng.integers(-self.jitter, self.jitter + 1, size=(n, 2))
        return np.stack([pool[first], pool[second]], axis=1).astype(np.int64), shifts.astype(np.int64)

    def _render(self, images: np.ndarray, sources: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """Canvases ``[N, S, S]`` in [0, 1]: left digit at (0, 0), right digit at ``shifts``, maximum."""
        n, s, d = len(sources), self.canvas_size, DIGIT_SIZE
        canvas = np.zeros((n, s, s), dtype=np.float32)
        canvas[:, :d, :d] = images[sources[:, 0]]
        right = np.zeros_like(canvas)
        ar = np.arange(d)
        rows = shifts[:, 0, None, None] + ar[None, :, None]
        cols = shifts[:, 1, None, None] + ar[None, None, :]
        right[np.arange(n)[:, None, None], rows, cols] = images[sources[:, 1]]
        np.maximum(canvas, right, out=canvas)
        return canvas

    def _build(self) -> None:
        images, labels = load_sklearn_digits()
        self.pools = digit_pools(self.seed, self.split_fractions)
        streams = dict(zip(_SPLITS, _seed_streams(self.seed)[1:], strict=True))
        canvases = {}
        for split in _SPLITS:
            sources, shifts = self._pairs(self.pools[split], self.num_samples[split], streams[split])
            self.source_indices[split] = sources
            self.displacements[split] = shifts
            canvases[split] = self._render(images, sources, shifts)
        if self.normalize and self.num_samples["train"] > 0:
            self.mean = float(canvases["train"].mean())
            self.std = float(canvases["train"].std())
        datasets = {}
        for split in _SPLITS:
            x = torch.from_numpy((canvases[split] - self.mean) / self.std).float().unsqueeze(1)
            sources = self.source_indices[split]
            targets = {
                "left": torch.from_numpy(labels[sources[:, 0]].copy()),
                "right": torch.from_numpy(labels[sources[:, 1]].copy()),
            }
            datasets[split] = TensorMultiTaskDataset(x, targets)
        self.train_set, self.val_set, self.test_set = datasets["train"], datasets["val"], datasets["test"]
