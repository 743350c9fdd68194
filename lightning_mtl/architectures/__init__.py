"""Shared encoders and multi-task architectures.

An architecture is a :class:`MultiTaskModule`'s ``encoder``: it holds the shared parameters (the ones
gradient methods aggregate over) and wraps its task-specific parts around each task's head.
"""

from lightning_mtl.architectures._base import MultiTaskArchitecture
from lightning_mtl.architectures.cross_stitch import CrossStitch
from lightning_mtl.architectures.encoders import DigitsCNN, TimmEncoder, timm_encoder
from lightning_mtl.architectures.hps import HardParameterSharing
from lightning_mtl.architectures.mmoe import MMoE
from lightning_mtl.architectures.mtan import MTAN
from lightning_mtl.architectures.multi_lenet import LeNetHead, MultiLeNet
from lightning_mtl.architectures.ple import CGC, PLE
from lightning_mtl.architectures.resnet_cifar import CifarResNet, PreActResNet18, ResNet18
from lightning_mtl.architectures.resnet_dilated import DeepLabHead, ResNetDilated
from lightning_mtl.architectures.segnet import SegNet
from lightning_mtl.architectures.transformers_encoder import TransformersEncoder

__all__ = [
    "CGC",
    "MMoE",
    "MTAN",
    "PLE",
    "CifarResNet",
    "CrossStitch",
    "DeepLabHead",
    "DigitsCNN",
    "HardParameterSharing",
    "LeNetHead",
    "MultiLeNet",
    "MultiTaskArchitecture",
    "PreActResNet18",
    "ResNet18",
    "ResNetDilated",
    "SegNet",
    "TimmEncoder",
    "TransformersEncoder",
    "timm_encoder",
]
