"""Dilated ResNet backbone (output stride 8) and a DeepLab-v3 ASPP head for dense tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.architectures.encoders import timm_encoder

__all__ = ["DeepLabHead", "ResNetDilated"]


class ResNetDilated(nn.Module):
    """A timm ResNet whose last stages use dilated convolutions instead of striding (output stride 8).

    Yu, Koltun and Funkhouser, "Dilated Residual Networks", CVPR 2017; with ResNet-50 (He et al., CVPR 2016)
    this is the shared encoder of LibMTL's NYUv2 benchmark (Lin and Zhang, "LibMTL", JMLR 2023). Returns a
    ``[B, C, H/8, W/8]`` map (2048 channels for ResNet-50); the dense tasks resize predictions to the label
    size. Nothing is downloaded: weights are random unless ``checkpoint_path`` names a local file (e.g. the
    ImageNet ResNet-50 weights LibMTL starts from).

    Args:
        model_name: a timm ResNet family name (``"resnet50"``, ``"resnet18"``, ...).
        checkpoint_path: local weights file.
        in_chans: input channels.
        output_stride: 8 or 16 (dilation replaces the strides below it).
        model_kwargs: further keyword arguments of ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        checkpoint_path: str | None = None,
        in_chans: int = 3,
        output_stride: int = 8,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        kwargs = dict(model_kwargs or {})
        self.model = timm_encoder(
            model_name, checkpoint_path, in_chans=in_chans, output_stride=output_stride, global_pool="", **kwargs
        )
        self.out_features = int(self.model.num_features)  # type: ignore[arg-type]  # timm models carry num_features; nn.Module types attributes as Tensor | Module

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DeepLabHead(nn.Module):
    """DeepLab-v3 head: atrous spatial pyramid pooling, a 3x3 conv and a 1x1 classifier.

    Chen, Papandreou, Schroff and Adam, "Rethinking Atrous Convolution for Semantic Image Segmentation",
    arXiv:1706.05587, 2017; LibMTL's task decoder on the dilated ResNet. Branches: a 1x1 conv, three dilated
    3x3 convs (rates 12, 24, 36) and image-level pooling, concatenated and projected to ``width`` channels.

    Args:
        in_channels: feature channels of the backbone.
        out_channels: outputs per pixel (classes, 1 for depth, 3 for normals).
        rates: dilation rates of the 3x3 branches.
        width: channels of every branch and of the projection.
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: Sequence[int] = (12, 24, 36), width: int = 256
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, width, 1)] + [_conv_bn_relu(in_channels, width, 3, r) for r in rates]
        )
        # no batch norm on the pooled branch: a 1x1 map of a batch of one has no statistics
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, width, 1), nn.ReLU())
        self.project = _conv_bn_relu(width * (len(rates) + 2), width, 1)
        self.classifier = nn.Sequential(_conv_bn_relu(width, width, 3), nn.Conv2d(width, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.pooled(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        features = torch.cat([branch(x) for branch in self.branches] + [pooled], 1)
        return self.classifier(self.project(features))
