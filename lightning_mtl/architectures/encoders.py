"""Shared encoders: a small CNN for the embedded digits data and a factory for any timm model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_mtl._weights import create_timm_model

_NOT_FOUND = "timm checkpoint for {model_name!r} not found at {path}: give a local weights file"


class DigitsCNN(nn.Module):
    """A small VGG-style CNN for the 8x8-digit data sets (MultiDigits, Digits).

    Two stages of two 3x3 conv-BN-ReLU layers, a 2x2 max-pool between them, an adaptive average pool
    that keeps a coarse spatial grid (the tasks of MultiDigits are "which digit is upper left / lower
    right", so where a stroke is matters), and a linear projection to ``out_features``.

    Args:
        in_channels: input channels (1 for the digits).
        channels: widths of the two stages.
        grid: side of the spatial grid kept before the projection.
        out_features: size of the shared representation.
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (32, 64), grid: int = 3, out_features: int = 128
    ) -> None:
        super().__init__()
        c1, c2 = channels

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, c1), *block(c1, c1), nn.MaxPool2d(2), *block(c1, c2), *block(c2, c2),
            nn.AdaptiveAvgPool2d(grid),
        )  # fmt: skip
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(c2 * grid * grid, out_features), nn.ReLU(inplace=True))
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x))


class TimmEncoder(nn.Module):
    """Any timm model by name as a shared encoder, without its classifier (``num_classes=0``).

    Nothing is downloaded: weights start random unless ``checkpoint_path`` names a local file
    (a timm/torchvision ``state_dict``, ``.pth``/``.bin``/``.safetensors``; a classifier in the file
    is dropped).

    Args:
        model_name: a name from ``timm.list_models()``, e.g. ``"resnet18"``.
        checkpoint_path: local weights to load.
        in_chans: input channels.
        model_kwargs: further keyword arguments of ``timm.create_model`` (e.g. ``img_size``).
    """

    def __init__(
        self,
        model_name: str,
        checkpoint_path: str | None = None,
        in_chans: int = 3,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = timm_encoder(model_name, checkpoint_path, in_chans=in_chans, **(model_kwargs or {}))
        self.out_features = int(self.model.num_features)  # type: ignore[arg-type]  # timm models carry num_features; nn.Module types attributes as Tensor | Module

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def timm_encoder(model_name: str, checkpoint_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build ``timm.create_model(model_name, num_classes=0, **kwargs)``, weights random or from a local file.

    With ``checkpoint_path`` the weights are loaded from that local file by the package's one loader,
    :func:`lightning_mtl._weights.create_timm_model` (strictly, after dropping the classifier keys that a
    ``num_classes=0`` model has no room for).

    Raises:
        ValueError: timm has no model of that name.
        FileNotFoundError: ``checkpoint_path`` is not a file.
        lightning_mtl._weights.WeightsMismatchError: the file does not fit the model (a ``ValueError``).
    """
    import timm

    if model_name not in timm.list_models() and not timm.is_model(model_name):
        raise ValueError(f"timm has no model named {model_name!r}; see timm.list_models()")
    return create_timm_model(model_name, checkpoint_path, not_found=_NOT_FOUND, **kwargs)
