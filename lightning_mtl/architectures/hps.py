"""Hard parameter sharing: one shared backbone, one head per task."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtl.architectures._base import MultiTaskArchitecture

__all__ = ["HardParameterSharing"]


class HardParameterSharing(MultiTaskArchitecture):
    """Hard parameter sharing: every task reads the same backbone features through its own head.

    Caruana, "Multitask Learning", Machine Learning 28, 1997. It is what
    :class:`~lightning_mtl.multitask.module.MultiTaskModule` does with any plain encoder; this class names
    it, so configs and benchmarks can swap architectures, and reads the feature size off the backbone.

    Args:
        backbone: any module mapping inputs to features (``[B, D]`` or ``[B, C, H, W]``).
        out_features: the feature size (``D`` or ``C``); read from ``backbone.out_features`` (or timm's
            ``num_features``) when not given.
    """

    returns_tensor = True

    def __init__(self, backbone: nn.Module, out_features: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        size = out_features or getattr(backbone, "out_features", None) or getattr(backbone, "num_features", None)
        if not isinstance(size, int):
            raise ValueError(f"cannot tell the feature size of {type(backbone).__name__}: give out_features")
        self.out_features = size

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def build_task_head(self, name: str, head: nn.Module) -> nn.Module:
        return head
