"""Picklable image transforms of the ViT continual-learning recipes, configurable from YAML.

Both take what our image data modules hand to a transform, a uint8 ``tv_tensors.Image`` ``[C, H, W]``
(or a float ``[C, H, W]`` tensor in [0, 1], as :class:`~lightning_mtl.datamodules.Digits` gives), and
return a float32 ``[3, S, S]`` tensor: greyscale is repeated to RGB, the image resized to ``S x S``
and, for training, randomly cropped with padding and flipped, the augmentation of the official
Si-Blurry / MVP code. With ``mean`` / ``std`` the result is normalized (the defaults, 0.5, are those
of the ImageNet-21k ViT-B/16 weights); with ``mean=None, std=None`` it stays in [0, 1] (e.g. for
Digits, which standardizes after its transform).

In YAML::

    train_transform:
      class_path: lightning_mtl.continual.transforms.ViTTrainTransform
      init_args: {image_size: 224}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchvision.transforms import InterpolationMode, v2

from lightning_mtl._transforms import ComposedTransform

__all__ = ["ViTEvalTransform", "ViTTrainTransform"]

_VIT_MEAN = (0.5, 0.5, 0.5)
_VIT_STD = (0.5, 0.5, 0.5)


def _check_size(image_size: int) -> int:
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    return int(image_size)


class ViTTrainTransform(ComposedTransform):
    """Training augmentation of the Si-Blurry / MVP code (Moon et al., "Online Class Incremental Learning
    on Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023): ``Resize((S, S))``,
    ``RandomCrop(S, padding)``, a horizontal flip, then float32 and ``Normalize(mean, std)``.

    Args:
        image_size: output side ``S``.
        padding: zero padding of the random crop (official: 4; 0 leaves the crop out).
        hflip: flip horizontally with probability 0.5.
        mean: per-channel normalization mean (give both ``mean`` and ``std`` or neither; None keeps [0, 1]).
        std: per-channel normalization standard deviation.
    """

    def __init__(
        self,
        image_size: int = 224,
        padding: int = 4,
        hflip: bool = True,
        mean: Sequence[float] | None = _VIT_MEAN,
        std: Sequence[float] | None = _VIT_STD,
    ) -> None:
        size = _check_size(image_size)
        if int(padding) != padding or padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {padding}")
        steps: list[Any] = [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((size, size), interpolation=InterpolationMode.BILINEAR, antialias=True),
        ]
        if padding:
            steps.append(v2.RandomCrop(size, padding=int(padding)))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        super().__init__(steps, mean, std)


class ViTEvalTransform(ComposedTransform):
    """Evaluation transform of the Si-Blurry / MVP code: ``Resize((S, S))``, float32, ``Normalize(mean, std)``.

    Args:
        image_size: output side ``S``.
        mean: per-channel normalization mean (give both ``mean`` and ``std`` or neither; None keeps [0, 1]).
        std: per-channel normalization standard deviation.
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] | None = _VIT_MEAN,
        std: Sequence[float] | None = _VIT_STD,
    ) -> None:
        size = _check_size(image_size)
        steps: list[Any] = [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize((size, size), interpolation=InterpolationMode.BILINEAR, antialias=True),
        ]
        super().__init__(steps, mean, std)
