"""The sklearn digits with a planted spurious feature: a bright border pixel that names the label in training."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_mtl.datamodules.digits import Digits

__all__ = ["SPURIOUS_PIXELS", "SpuriousDigits"]

# (row, column) of the pixel that names class c: the top row, then two of the left column; the sklearn
# digits leave these border pixels dark in most images, so the planted pixel is easy to read
SPURIOUS_PIXELS: tuple[tuple[int, int], ...] = tuple((0, c) for c in range(8)) + ((2, 0), (5, 0))


class SpuriousDigits(Digits):
    """:class:`Digits` with a planted spurious feature, for fine-tuning under distribution shift.

    Every image gets one bright pixel on its border, at the position :data:`SPURIOUS_PIXELS` gives for a
    class ``s``. In the training and validation splits ``s`` is the image's label with probability
    ``correlation`` (else a uniformly random class), so the pixel alone predicts the label on them; in the
    test split ``s`` is uniformly random (``test_mode="random"``) or no pixel is planted
    (``test_mode="clean"``), so a model that reads the pixel fails there. The pixel is planted on the
    [0, 1] images (value ``intensity``) before the training split's standardisation; with ``image_size > 8``
    it becomes a square of ``image_size // 8`` pixels. The choice of ``s`` is seeded by ``seed``.

    Args:
        correlation: probability that the pixel names the true label in training / validation.
        intensity: grey level of the pixel, in [0, 1].
        test_mode: ``"random"`` (the pixel names a random class) or ``"clean"`` (no pixel) in the test split.
        **kwargs: the arguments of :class:`Digits` (transforms excepted).
    """

    def __init__(
        self, correlation: float = 0.95, intensity: float = 1.0, test_mode: str = "random", **kwargs: Any
    ) -> None:
        if kwargs.get("train_transform") is not None or kwargs.get("eval_transform") is not None:
            raise ValueError("SpuriousDigits plants its pixel on the stored images and takes no transforms")
        if not 0.0 <= correlation <= 1.0:
            raise ValueError(f"correlation must be in [0, 1], got {correlation}")
        if test_mode not in ("random", "clean"):
            raise ValueError(f"test_mode must be 'random' or 'clean', got {test_mode!r}")
        super().__init__(**kwargs)
        self.correlation = float(correlation)
        self.intensity = float(intensity)
        self.test_mode = test_mode
        self.save_hyperparameters()

    def _build(self) -> None:
        super()._build()
        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), 0x5EED]))
        side = max(1, self.image_size // 8)
        value = (self.intensity - self.mean) / self.std if self.normalize else self.intensity
        self.spurious: dict[str, torch.Tensor] = {}
        for split in ("train", "val", "test"):
            dataset: Any = getattr(self, f"{split}_set")
            labels = dataset.targets[self.task_name] if self.as_dict else dataset.targets
            n = len(labels)
            random_class = torch.from_numpy(rng.integers(0, 10, size=n))
            keep = torch.from_numpy(rng.random(n) < self.correlation)
            if split == "test":
                names = random_class
            else:
                names = torch.where(keep, labels, random_class)
            self.spurious[split] = names
            if split == "test" and self.test_mode == "clean":
                continue
            for i, c in enumerate(names.tolist()):
                row, col = SPURIOUS_PIXELS[c]
                dataset.inputs[i, :, row * side : (row + 1) * side, col * side : (col + 1) * side] = value
