"""Shared encoders and multi-task architectures."""

from lightning_mtl.architectures.encoders import DigitsCNN, TimmEncoder, timm_encoder

__all__ = ["DigitsCNN", "TimmEncoder", "timm_encoder"]
