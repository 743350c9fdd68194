"""Offline linear evaluation: a linear classifier on the frozen backbone of a self-supervised checkpoint."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl._schedules import check_horizon
from lightning_mtl.ssl.barlow_twins import _infer_feature_dim, split_views

__all__ = ["LinearEvaluation", "load_backbone_weights"]


def load_backbone_weights(backbone: nn.Module, checkpoint_path: str, prefix: str = "backbone.") -> None:
    """Load ``backbone``'s weights from a Lightning checkpoint of an SSL module (the keys under ``prefix``
    of its ``state_dict``) or from a plain ``state_dict`` (with or without ``prefix``). Strict: every
    backbone key must be there with the right shape, else a ``ValueError`` says which are missing. Only
    tensors and plain containers are unpickled (``torch.load(weights_only=True)``)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found at {path}: give the .ckpt file of a self-supervised run")
    try:
        # tensors and containers only: unpickling arbitrary objects could run code from the file
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False; keep only its reason
        detail = str(error).partition("WeightsUnpickler error:")[2].split(". Please")[0]
        reason = next((part.strip() for part in detail.split("\n\n") if part.strip()), type(error).__name__)
        raise ValueError(
            f"{path} is not a checkpoint of tensors and containers alone ({reason}); other objects are never "
            "unpickled: save the backbone's weights, torch.save(module.state_dict(), path), and give that file"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint or state_dict")
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(
            f"{path} does not fit the backbone {type(backbone).__name__}: {len(missing)} keys missing, e.g. "
            f"{missing[:3]} (keys under prefix {prefix!r} are read)"
        )
    backbone.load_state_dict({key: state[key] for key in own})


class LinearEvaluation(pl.LightningModule):
    """Linear evaluation of a self-supervised representation: the backbone is loaded from a checkpoint,
    frozen (no gradients, BatchNorm statistics kept: it stays in eval mode) and a linear classifier is
    trained on its features with cross-entropy.

    The protocol: select the epoch (``ModelCheckpoint(monitor="val/acc", mode="max")``) on a validation
    split held out of the training images, then test that checkpoint once (``--test_after_fit true``).

    Batches are ``(images, labels)`` (a multi-view batch uses its first view); negative labels are
    ignored (e.g. STL-10's unlabelled images). Logged: ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc``, ``val/acc_top5`` (10+ classes), and the same under ``test/``.

    Args:
        backbone: the backbone architecture (the same as in the self-supervised run).
        num_classes: number of classes of the linear classifier.
        checkpoint_path: the self-supervised checkpoint (a Lightning ``.ckpt`` of
            :class:`~lightning_mtl.ssl.BarlowTwins` and the like, or a backbone ``state_dict``); without it
            a randomly initialized backbone is evaluated (a baseline), with a warning.
        checkpoint_prefix: prefix of the backbone's keys in the checkpoint's ``state_dict``.
        feature_dim: backbone output size, read from the backbone when None.
        optimizer: optimizer factory for the classifier (the official recipe: Adam, lr 0.01, weight decay
            5e-6, 200 epochs, exponential decay to 1e-6).
        lr_scheduler: optional LR scheduler factory (stepped per epoch).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        checkpoint_path: str | None = None,
        checkpoint_prefix: str = "backbone.",
        feature_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        save_init_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"], logger=False)
        if checkpoint_path is not None:
            load_backbone_weights(backbone, checkpoint_path, checkpoint_prefix)
        else:
            rank_zero_warn("LinearEvaluation without checkpoint_path evaluates a randomly initialized backbone")
        self.backbone = backbone.eval().requires_grad_(False)
        self.feature_dim = int(feature_dim) if feature_dim is not None else _infer_feature_dim(backbone)
        self.head = nn.Linear(self.feature_dim, int(num_classes))
        self.num_classes = int(num_classes)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        top_k = (1, 5) if num_classes >= 10 else (1,)

        def accuracies() -> nn.ModuleDict:
            return nn.ModuleDict(
                {
                    _acc_name(k): MulticlassAccuracy(num_classes, top_k=k, average="micro", ignore_index=-1)
                    for k in top_k
                }
            )

        # (a ModuleDict keyed by stage cannot hold "train": that name is nn.Module.train)
        self.train_metrics, self.val_metrics, self.test_metrics = accuracies(), accuracies(), accuracies()
        self.metric_directions: dict[str, bool] = {
            f"{stage}/{name}": True for stage in ("val", "test") for name in self.val_metrics
        } | {"val/loss": False, "test/loss": False}

    def train(self, mode: bool = True) -> LinearEvaluation:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps the statistics of the self-supervised run
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone(images)
        return self.head(features.float())

    def _step(self, batch: Any, stage: str) -> Tensor:
        views, labels = split_views(batch)
        if labels is None:
            raise ValueError("LinearEvaluation needs labelled batches (images, labels)")
        logits = self(views[0])
        labels = torch.where(labels < 0, torch.full_like(labels, -1), labels)
        valid = labels >= 0
        loss = F.cross_entropy(logits, labels, ignore_index=-1) if bool(valid.any()) else logits.sum() * 0
        size = int(valid.sum())
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage == "val", batch_size=size,
                 sync_dist=not on_step)  # fmt: skip
        for name, metric in getattr(self, f"{stage}_metrics").items():
            metric(logits, labels)
            self.log(
                f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=stage != "train" and name == "acc"
            )
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.head.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": check_horizon(self, {"scheduler": self.lr_scheduler_factory(optimizer)}),
        }


def _acc_name(k: int) -> str:
    return "acc" if k == 1 else f"acc_top{k}"
