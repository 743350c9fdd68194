"""Experience replay and the frozen-backbone linear baseline of online continual learning."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.continual.base import ContinualModule
from lightning_mtl.continual.prompts import create_vit

__all__ = ["ER", "LinearBaseline"]


class ER(ContinualModule):
    """Experience replay (Rolnick et al., "Experience Replay for Continual Learning", NeurIPS 2019; the
    ER baseline of the Si-Blurry benchmark, Moon et al., ICCV 2023): the network is trained on each
    stream batch together with samples replayed from a reservoir memory.

    The memory lives in the data stream (:class:`~lightning_mtl.continual.stream.SiBlurryStream`'s
    ``memory_size`` / ``memory_batch_size``): which samples it holds depends only on the stream and its
    seed, so it survives a restart without being stored, and every rank of a DDP run holds the same
    one. This module is plain fine-tuning of a timm ViT and a linear head on what the stream gives;
    with ``memory_size: 0`` it is the fine-tuning lower bound.

    Args:
        num_classes: classes of the stream.
        backbone: timm model name (built with ``num_classes=0``: it returns pooled features).
        checkpoint_path: local file with the backbone's pretrained weights (nothing is downloaded).
        vit_kwargs: extra arguments of the timm model (``img_size``, ``depth``, ... for small ViTs).
        freeze_backbone: train only the head on frozen features (the backbone stays in eval mode).
        optimizer: optimizer factory (default Adam, lr 5e-3).
        lr_scheduler: optional scheduler factory.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "vit_base_patch16_224",
        checkpoint_path: str | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        freeze_backbone: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer, lr_scheduler)
        self.save_hyperparameters()
        self.backbone = create_vit(backbone, checkpoint_path=checkpoint_path, **(vit_kwargs or {}))
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        self.head = nn.Linear(self.backbone.num_features, self.num_classes)  # type: ignore[arg-type]  # timm models carry num_features

    def train(self, mode: bool = True) -> ER:
        super().train(mode)
        if self.freeze_backbone:
            # a frozen backbone keeps its dropout / drop-path off while the head trains
            self.backbone.eval()
        return self

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)


class LinearBaseline(ER):
    """The frozen-backbone linear baseline: a linear head trained online on the features of a frozen
    pretrained ViT (no prompts, no replay unless the stream has a memory).

    Prompt-based continual learners are only worth their cost where they beat it; Janson et al. ("A
    Simple Baseline that Questions the Use of Pretrained-Models in Continual Learning", NeurIPS 2022
    workshop) show how strong it is, so every recipe folder has one. Same arguments as :class:`ER`, with
    the backbone frozen.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "vit_base_patch16_224",
        checkpoint_path: str | None = None,
        vit_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            backbone=backbone,
            checkpoint_path=checkpoint_path,
            vit_kwargs=vit_kwargs,
            freeze_backbone=True,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
        )
