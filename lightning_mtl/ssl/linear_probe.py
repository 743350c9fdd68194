"""Online linear probe: a linear classifier trained beside a self-supervised module on its detached features."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl._distributed import mean_over_ranks_, sum_over_ranks
from lightning_mtl._features import batch_features, check_feature_hook, check_labelled, check_num_classes

__all__ = ["OnlineLinearProbe"]


class OnlineLinearProbe(pl.Callback):
    """A linear classifier trained online on the **detached** features of any self-supervised
    LightningModule, with its own optimizer: no gradient ever reaches the module (the features are
    ``outputs["features"]`` of the training step, detached, or computed without gradients in eval mode).

    One probe update per training batch (on the labelled samples of the first view), after the module's
    own step. Validation and test batches are classified; logged: ``train/<name>/loss`` (per step),
    ``val/<name>/acc``, ``val/<name>/loss`` and the same under ``test/``. Select checkpoints on the
    validation keys; the probe's weights and optimizer state are in the checkpoint (callback state),
    so testing the best checkpoint tests the probe that went with it.

    What it cannot work with stops ``fit`` before the first step: at setup an unknown feature size, a
    module with none of ``extract_features`` / ``backbone`` / ``encoder`` / ``forward``, or ``num_classes``
    below the datamodule's; at the first training (or sanity-check) batch, batches without labels.

    Under DDP every rank holds a copy of the probe and its gradients are averaged over the ranks before
    each update (the copies stay identical); counts for the metrics are summed over the ranks.

    Args:
        num_classes: number of classes.
        feature_dim: size of the features; the module's ``feature_dim`` attribute when None.
        lr: learning rate of the probe's Adam.
        weight_decay: weight decay of the probe's Adam.
        feature_key: key of the features in the steps' outputs.
        name: the metric group (``val/<name>/acc``).
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        feature_key: str = "features",
        name: str = "probe",
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.feature_dim = feature_dim
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.feature_key = feature_key
        self.name = name.strip("/")
        self.head: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self._counts: Tensor | None = None

    # -- construction ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        directions = getattr(pl_module, "metric_directions", None)
        if isinstance(directions, dict):
            for split in ("val", "test"):
                directions[f"{split}/{self.name}/acc"] = True
                directions[f"{split}/{self.name}/loss"] = False
        if self.head is None:
            dim = self.feature_dim if self.feature_dim is not None else getattr(pl_module, "feature_dim", None)
            if not isinstance(dim, int):
                raise ValueError(
                    "OnlineLinearProbe cannot tell the feature size: give feature_dim, or give the module a "
                    "`feature_dim` attribute"
                )
            self.head = nn.Linear(dim, self.num_classes)
            self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        # what can be told before any step: a module with no features to read, too few classes
        check_feature_hook(pl_module, "OnlineLinearProbe")
        check_num_classes(trainer, self.num_classes, "OnlineLinearProbe")

    def _ready(self, device: torch.device) -> nn.Linear:
        if self.head is None or self.optimizer is None:
            raise RuntimeError("OnlineLinearProbe was not set up (it is a Trainer callback)")
        if self.head.weight.device != device:
            self.head.to(device)  # in place: the optimizer keeps its references
        if self._pending is not None:
            self.head.load_state_dict(self._pending["head"])
            self.optimizer.load_state_dict(self._pending["optimizer"])  # moves the state to the parameters
            self._pending = None
        return self.head

    # -- training ------------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_labelled(batch, "OnlineLinearProbe", "training")  # before the module's step, not after it

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        features, labels = batch_features(pl_module, outputs, batch, self.feature_key)
        if labels is None:
            raise ValueError("OnlineLinearProbe needs labelled training batches ((views, labels))")
        head, optimizer = self._ready(features.device), self.optimizer
        assert optimizer is not None  # _ready checked it
        keep = labels >= 0
        with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
            logits = head(features.detach())
            # a rank without labelled samples still takes part in the gradient average (zero gradient)
            loss = F.cross_entropy(logits[keep], labels[keep], reduction="sum") / keep.sum().clamp_min(1)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
        for parameter in head.parameters():
            assert parameter.grad is not None  # zero_grad(set_to_none=False) and backward above
            mean_over_ranks_(parameter.grad)
        optimizer.step()
        pl_module.log(
            f"train/{self.name}/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=int(keep.sum())
        )

    # -- evaluation --------------------------------------------------------------------------------
    def _start(self, pl_module: pl.LightningModule) -> None:
        self._counts = torch.zeros(3, device=pl_module.device)  # correct, total, summed loss

    def _batch(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        if self._counts is None:
            return
        features, labels = batch_features(pl_module, outputs, batch, self.feature_key)
        if labels is None:
            raise ValueError("OnlineLinearProbe needs labelled evaluation batches (images, labels)")
        keep = labels >= 0
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            logits = self._ready(features.device)(features[keep])
            self._counts[0] += (logits.argmax(1) == labels[keep]).sum()
            self._counts[1] += keep.sum()
            self._counts[2] += F.cross_entropy(logits, labels[keep], reduction="sum") if len(logits) else 0.0

    def _end(self, pl_module: pl.LightningModule, split: str) -> None:
        if self._counts is None:
            return
        correct, total, loss = sum_over_ranks(self._counts).tolist()
        self._counts = None
        if total > 0:
            pl_module.log(f"{split}/{self.name}/acc", correct / total, prog_bar=split == "val")
            pl_module.log(f"{split}/{self.name}/loss", loss / total)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        check_labelled(batch, "OnlineLinearProbe", "validation")  # in the sanity check already, before any step

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._batch(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(pl_module, "test")

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.head is None or self.optimizer is None:
            return dict(self._pending) if self._pending is not None else {}
        if self._pending is not None:  # restored but not used yet
            return dict(self._pending)
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending = {"head": state_dict["head"], "optimizer": state_dict["optimizer"]}
