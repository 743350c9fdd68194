"""Barlow Twins as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mtl._features import split_views
from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl._schedules import check_horizon
from lightning_mtl.ssl.losses import BarlowTwinsLossTerms, barlow_twins_loss

__all__ = ["BarlowTwins", "build_projector", "split_views", "warmup_cosine_factor"]


def build_projector(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """``Linear(no bias) - BN - ReLU`` for each hidden size, then ``Linear(out_features)`` (the Barlow Twins
    projector of the official Mixed Barlow Twins code: 512 -> 512 (BN, ReLU) -> d for a ResNet-18)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, int(size), bias=False), nn.BatchNorm1d(int(size)), nn.ReLU(inplace=True)]
        width = int(size)
    layers.append(nn.Linear(width, int(out_features)))
    return nn.Sequential(*layers)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_factor: float = 1e-3) -> float:
    """LR factor of the official schedule: linear warm-up over ``warmup_steps``, then a cosine from 1 to
    ``final_factor`` at ``total_steps`` (constant ``final_factor`` after it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    q = 0.5 * (1 + math.cos(math.pi * progress))
    return q + final_factor * (1 - q)


class BarlowTwins(pl.LightningModule):
    """Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction",
    ICML 2021): a backbone and a projector trained so that the cross-correlation of the embeddings of two
    augmented views is close to the identity.

    Training batches are ``((view_a, view_b), labels)`` (labels are not used by the loss); validation and
    test batches ``(images, labels)``. ``training_step`` returns ``{"loss", "features"}`` and
    ``validation_step`` / ``test_step`` return ``{"features"}`` (the detached backbone features of the
    first view / of the images), which the evaluation callbacks
    (:class:`~lightning_mtl.ssl.knn.KNNMonitor`,
    :class:`~lightning_mtl.ssl.linear_probe.OnlineLinearProbe`) read instead of running the backbone
    again. Select checkpoints on their validation metrics (e.g. ``val/knn/acc``), never on the test split.

    DDP: the loss standardizes over the global batch and reduces the cross-correlation with a
    differentiable all-reduce, so the update equals the single-process update on the concatenated batch
    when the BatchNorm layers are synchronized too (``Trainer(sync_batchnorm=True)``; without it each rank
    normalizes its own batch in the backbone and projector, as the official CIFAR code on one GPU does
    per batch, and a warning says so).

    Logged: ``train/loss``, ``train/loss_bt``, ``train/on_diag``, ``train/off_diag``.

    Args:
        backbone: any ``nn.Module`` mapping images to ``[B, F]`` features (e.g.
            :class:`~lightning_mtl.architectures.resnet_cifar.ResNet18`, ``TimmEncoder``, ``DigitsCNN``).
        embedding_dim: output size ``d`` of the projector (1024 in the published CIFAR / STL-10 /
            Tiny-ImageNet recipes).
        projector_hidden: hidden sizes of the projector (each ``Linear - BN - ReLU``); ``(512,)`` as published.
        lambda_bt: weight of the off-diagonal terms (1/128 for CIFAR / STL-10, 1/1024 for Tiny-ImageNet).
        feature_dim: backbone output size, read from ``backbone.out_features`` / ``num_features`` when None.
        optimizer: optimizer factory, called with the parameters (Adam, lr 0.01 * batch / 256, weight
            decay 1e-6 in the published recipes).
        lr_scheduler: an LR scheduler factory (stepped per epoch); replaces the built-in schedule.
        warmup_epochs: built-in schedule: linear warm-up over this many epochs (per step), then ...
        cosine: ... a per-step cosine decay to ``final_lr_factor`` times the base LR at the last step
            (False: constant after the warm-up).
        final_lr_factor: LR at the end of the cosine, relative to the base LR (0.001 as published).
        eps: added to the variances of the standardization.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int = 1024,
        projector_hidden: Sequence[int] = (512,),
        lambda_bt: float = 1 / 128,
        feature_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_epochs: float = 10.0,
        cosine: bool = True,
        final_lr_factor: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if lambda_bt < 0:
            raise ValueError(f"lambda_bt must be >= 0, got {lambda_bt}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        save_init_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"], logger=False)
        self.backbone = backbone
        self.feature_dim = int(feature_dim) if feature_dim is not None else _infer_feature_dim(backbone)
        self.projector = build_projector(self.feature_dim, projector_hidden, embedding_dim)
        self.lambda_bt = float(lambda_bt)
        self.eps = float(eps)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.warmup_epochs = float(warmup_epochs)
        self.cosine = bool(cosine)
        self.final_lr_factor = float(final_lr_factor)
        # read by BestMetricsSummary: the evaluation callbacks add their (higher-is-better) keys
        self.metric_directions: dict[str, bool] = {"train/loss": False}

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """Backbone features ``[B, F]`` (what is evaluated downstream)."""
        return self.backbone(images)

    def extract_features(self, images: Tensor) -> Tensor:
        """The representation the evaluation callbacks use: the backbone features."""
        return self.backbone(images)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(features, projector embedding)`` of a batch of images."""
        features = self.backbone(images)
        return features, self.projector(features)

    # -- training --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._trainer is None or stage != "fit" or self.trainer.world_size == 1:
            return
        plain_bn = [n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                    and not isinstance(m, nn.SyncBatchNorm)]  # fmt: skip
        if plain_bn:
            rank_zero_warn(
                f"{type(self).__name__} under {self.trainer.world_size} processes with unsynchronized BatchNorm "
                f"({len(plain_bn)} layers, e.g. {plain_bn[0]}): each rank normalizes its own batch, so the update "
                "is not the single-process update on the global batch; set Trainer(sync_batchnorm=True) "
                "(trainer.sync_batchnorm: true) for that"
            )

    def compute_loss(self, views: list[Tensor], batch_idx: int) -> tuple[BarlowTwinsLossTerms, Tensor]:
        """The loss terms of two views and the detached features of the first view."""
        if len(views) < 2:
            raise ValueError(
                f"{type(self).__name__} trains on two augmented views per image, got {len(views)}; give the "
                "DataModule a two-view train_transform (lightning_mtl.ssl.TwoViews)"
            )
        h_a, z_a = self.embed(views[0])
        _, z_b = self.embed(views[1])
        return barlow_twins_loss(z_a, z_b, self.lambda_bt, eps=self.eps), h_a.detach()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        views, _ = split_views(batch)
        terms, features = self.compute_loss(views, batch_idx)
        self._log_terms(terms, views[0].shape[0])
        return {"loss": terms.loss, "features": features}

    def _log_terms(self, terms: BarlowTwinsLossTerms, batch_size: int) -> None:
        if self._trainer is None:  # a step called by hand
            return
        # the loss is the loss of the global batch on every rank already: no sync_dist needed
        self.log("train/loss", terms.loss, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {"train/loss_bt": terms.loss_bt, "train/on_diag": terms.on_diag, "train/off_diag": terms.off_diag},
            batch_size=batch_size,
        )

    # -- evaluation: features for the callbacks ------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        views, _ = split_views(batch)
        return {"features": self.extract_features(views[0])}

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.validation_step(batch, batch_idx, dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        views, _ = split_views(batch)
        return self.extract_features(views[0])

    # -- optimization ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is not None:
            return {
                "optimizer": optimizer,
                "lr_scheduler": check_horizon(self, {"scheduler": self.lr_scheduler_factory(optimizer)}),
            }
        if self.warmup_epochs == 0 and not self.cosine:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                f"{type(self).__name__}'s warm-up / cosine schedule needs a finite run: set trainer.max_epochs or "
                "trainer.max_steps, or give model.init_args.lr_scheduler"
            )
        per_epoch = max(1, math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches))
        warmup = int(round(self.warmup_epochs * per_epoch))
        total = int(total)
        final = self.final_lr_factor

        def factor(step: int) -> float:
            if not self.cosine:
                return min(1.0, (step + 1) / warmup) if warmup else 1.0
            return warmup_cosine_factor(step, warmup, total, final)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _infer_feature_dim(backbone: nn.Module) -> int:
    for attr in ("out_features", "num_features", "embed_dim"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"cannot tell the output size of backbone {type(backbone).__name__}: give model.init_args.feature_dim, "
        "or give the backbone an `out_features` attribute"
    )
