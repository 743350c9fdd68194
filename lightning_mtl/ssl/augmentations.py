"""Augmentations for self-supervised learning, built on ``torchvision.transforms.v2``, configurable from YAML.

* :class:`SSLAugmentation`: one random view (crop, flip, colour jitter, grayscale, blur, solarization),
  then float32 in [0, 1] and, with ``mean`` / ``std``, normalization.
* :class:`EvalTransform`: the deterministic evaluation counterpart (optional resize and centre crop).
* :class:`TwoViews`: applies a transform twice (or two transforms) and returns the pair, the input of
  :class:`~lightning_mtl.ssl.BarlowTwins`. Plug it into a DataModule's ``train_transform``.

Inputs may be PIL images, ``torchvision.tv_tensors.Image`` or plain ``[C, H, W]`` tensors (uint8, or
float in [0, 1]). With a float tensor in [0, 1], the output stays in [0, 1] unless ``mean`` / ``std`` are
given.

In YAML::

    train_transform:
      class_path: lightning_mtl.ssl.TwoViews
      init_args:
        transform:
          class_path: lightning_mtl.ssl.SSLAugmentation
          init_args: {crop_size: 32, mean: [0.4914, 0.4822, 0.4465], std: [0.2023, 0.1994, 0.2010]}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torchvision.transforms import InterpolationMode, v2

from lightning_mtl._transforms import ComposedTransform

__all__ = ["EvalTransform", "SSLAugmentation", "TwoViews"]

_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class SSLAugmentation(ComposedTransform):
    """One random view for self-supervised learning (SimCLR / BYOL / Barlow Twins family).

    The steps, in order: ``RandomResizedCrop(crop_size, scale, ratio)``, horizontal flip
    (``hflip_p``), ``ColorJitter(*color_jitter)`` with probability ``color_jitter_p``, grayscale
    (``grayscale_p``), Gaussian blur (``blur_p``, sigma in ``blur_sigma``), solarization
    (``solarize_p``), then float32 in [0, 1] and ``Normalize(mean, std)`` when both are given.
    The defaults are the CIFAR recipe of the official Mixed Barlow Twins code. A probability of 0
    leaves a step out.

    Args:
        crop_size: output side (an int) of the random resized crop.
        crop_scale: range of the crop's area relative to the image.
        crop_ratio: range of the crop's aspect ratio.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        hflip_p: probability of a horizontal flip.
        color_jitter: brightness, contrast, saturation, hue of ``ColorJitter``.
        color_jitter_p: probability of applying the colour jitter.
        grayscale_p: probability of converting to grayscale (channels kept).
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur's sigma.
        blur_kernel: kernel size of the blur (odd); default about a tenth of ``crop_size``.
        solarize_p: probability of solarization.
        solarize_threshold: solarization threshold as a fraction of the maximum value.
        mean: per-channel normalization mean after conversion to [0, 1] floats (both or neither).
        std: per-channel normalization standard deviation.
    """

    def __init__(
        self,
        crop_size: int = 32,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
        hflip_p: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel: int | None = None,
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        for name, p in (("hflip_p", hflip_p), ("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p),
                        ("blur_p", blur_p), ("solarize_p", solarize_p)):  # fmt: skip
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        if len(color_jitter) != 4:
            raise ValueError(f"color_jitter is (brightness, contrast, saturation, hue), got {list(color_jitter)}")
        steps: list[Any] = [
            v2.ToImage(),
            v2.RandomResizedCrop(
                int(crop_size), scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                interpolation=_INTERPOLATION[interpolation], antialias=True,
            ),
        ]  # fmt: skip
        if hflip_p > 0:
            steps.append(v2.RandomHorizontalFlip(p=hflip_p))
        if color_jitter_p > 0 and any(float(v) > 0 for v in color_jitter):
            brightness, contrast, saturation, hue = (float(v) for v in color_jitter)
            jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
            steps.append(v2.RandomApply([jitter], p=color_jitter_p))
        if grayscale_p > 0:
            steps.append(v2.RandomGrayscale(p=grayscale_p))
        if blur_p > 0:
            kernel = blur_kernel if blur_kernel is not None else max(3, (int(crop_size) // 10) | 1)
            if kernel % 2 == 0:
                raise ValueError(f"blur_kernel must be odd, got {kernel}")
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=blur_p))
        if solarize_p > 0:
            # v2.RandomSolarize takes the threshold in the image's own scale: convert to float first
            steps.append(v2.ToDtype(torch.float32, scale=True))
            steps.append(v2.RandomSolarize(threshold=float(solarize_threshold), p=solarize_p))
        super().__init__(steps, mean, std)


class EvalTransform(ComposedTransform):
    """Deterministic evaluation transform: optional ``Resize(resize)`` and ``CenterCrop(crop_size)``,
    then float32 in [0, 1] and ``Normalize(mean, std)`` when both are given.

    Args:
        resize: side of the shorter edge after resizing (None: no resize).
        crop_size: side of the centre crop (None: no crop).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        mean: per-channel normalization mean (both or neither).
        std: per-channel normalization standard deviation.
    """

    def __init__(
        self,
        resize: int | None = None,
        crop_size: int | None = None,
        interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}")
        steps: list[Any] = [v2.ToImage()]
        if resize is not None:
            steps.append(v2.Resize(int(resize), interpolation=_INTERPOLATION[interpolation], antialias=True))
        if crop_size is not None:
            steps.append(v2.CenterCrop(int(crop_size)))
        super().__init__(steps, mean, std)


class TwoViews:
    """Two independently augmented views of one image: ``(transform(x), second(x))``.

    Args:
        transform: the augmentation of the first view (and of the second, unless ``second`` is given).
        second: a different augmentation for the second view (asymmetric recipes, e.g. BYOL's blur /
            solarization probabilities).
    """

    def __init__(self, transform: Callable[[Any], Any], second: Callable[[Any], Any] | None = None) -> None:
        if not callable(transform) or (second is not None and not callable(second)):
            raise TypeError("TwoViews needs callable transforms")
        self.transform = transform
        self.second = second if second is not None else transform

    def __call__(self, image: Any) -> tuple[Any, Any]:
        return self.transform(image), self.second(image)

    def __repr__(self) -> str:
        if self.second is self.transform:
            return f"{type(self).__name__}({self.transform!r})"
        return f"{type(self).__name__}({self.transform!r}, second={self.second!r})"
