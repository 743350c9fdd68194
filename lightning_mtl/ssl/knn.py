"""Online weighted kNN monitor for self-supervised representations."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mtl._distributed import gather_rows, max_over_ranks, sum_over_ranks
from lightning_mtl._features import batch_features, check_feature_hook, check_labelled, check_num_classes

__all__ = ["KNNMonitor", "weighted_knn_predict"]


def weighted_knn_predict(
    query: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.5,
    normalize: bool = True,
) -> Tensor:
    """Class scores of a weighted k-nearest-neighbour vote (Wu et al., "Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination", CVPR 2018; the monitor of the official Barlow Twins / Mixed
    Barlow Twins code).

    Each query takes its ``k`` most cosine-similar bank entries; neighbour ``j`` votes for its label with
    weight ``exp(sim_j / temperature)``. The predicted class is the argmax of the returned scores.

    Args:
        query: ``[B, D]`` features.
        bank: ``[N, D]`` features of the labelled reference set.
        bank_labels: ``[N]`` int labels in ``0 .. num_classes - 1``.
        num_classes: number of classes (columns of the result).
        k: neighbours per query (at most ``N``).
        temperature: temperature of the vote weights.
        normalize: L2-normalize query and bank first (cosine similarity); False if they already are.

    Returns:
        ``[B, num_classes]`` summed vote weights.

    Examples:
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> scores = weighted_knn_predict(torch.tensor([[1.0, 0.05]]), bank, torch.tensor([0, 0, 1]), 2, k=2)
        >>> int(scores.argmax())
        0
    """
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query [B, D] and bank [N, D] must share D, got {tuple(query.shape)} and {tuple(bank.shape)}")
    if len(bank) == 0:
        raise ValueError("the kNN feature bank is empty")
    if normalize:
        query, bank = F.normalize(query, dim=1), F.normalize(bank, dim=1)
    sim = query @ bank.T
    weights, index = sim.topk(min(int(k), bank.shape[0]), dim=1)
    votes = (weights / temperature).exp()
    scores = torch.zeros(query.shape[0], int(num_classes), device=query.device, dtype=votes.dtype)
    return scores.scatter_add_(1, bank_labels[index], votes)


class KNNMonitor(pl.Callback):
    """Online weighted kNN accuracy of any self-supervised LightningModule, logged as ``<prefix>/acc``
    (``val/knn/acc`` by default; select checkpoints on it: ``ModelCheckpoint(monitor="val/knn/acc",
    mode="max")``).

    The feature bank is filled during the training epochs that end with a kNN evaluation, from the
    features of the first view of each labelled training sample (what the step returned as
    ``outputs["features"]``, e.g. by :class:`~lightning_mtl.ssl.BarlowTwins`, else the module's
    ``extract_features`` / ``backbone`` / ``encoder`` in eval mode without gradients). At validation the
    ranks' banks are gathered, so every rank votes with the whole training set, and each validation
    sample (features from ``validation_step``'s ``outputs["features"]`` or computed likewise) is
    classified by :func:`weighted_knn_predict`; correct and total counts are summed over the ranks.
    Samples with a negative label (unlabelled, e.g. STL-10's) are left out of bank and score.

    What it cannot work with stops ``fit`` before the first step: at setup a module with none of
    ``extract_features`` / ``backbone`` / ``encoder`` / ``forward``, or ``num_classes`` below the
    datamodule's; at the first training (or sanity-check) batch, batches without labels.

    This is the cheap online estimate (solo-learn's monitor works the same way): the bank holds augmented
    views encoded by the weights of the moment during the epoch. The exact protocol (a bank of
    un-augmented training images, encoded by the final weights) is the offline evaluation
    (``docs/ssl.md``). Nothing is evaluated on the test split.

    Args:
        k: neighbours (200 as published).
        temperature: temperature of the vote weights ``exp(sim / T)`` (0.5 as published).
        num_classes: number of classes; the largest bank label + 1 when None.
        every_n_epochs: fill the bank, and evaluate, in every n-th epoch (validation epochs in between
            log nothing; match ``trainer.check_val_every_n_epoch``).
        max_bank_size: keep at most this many bank entries per rank (the first ones of the epoch); None: all.
        feature_key: key of the features in the steps' outputs.
        prefix: prefix of the logged key.
    """

    def __init__(
        self,
        k: int = 200,
        temperature: float = 0.5,
        num_classes: int | None = None,
        every_n_epochs: int = 1,
        max_bank_size: int | None = None,
        feature_key: str = "features",
        prefix: str = "val/knn",
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be positive, got {every_n_epochs}")
        self.k = int(k)
        self.temperature = float(temperature)
        self.num_classes = num_classes
        self.every_n_epochs = int(every_n_epochs)
        self.max_bank_size = max_bank_size
        self.feature_key = feature_key
        self.prefix = prefix.rstrip("/")
        self._features: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._stored = 0
        self._bank: tuple[Tensor, Tensor, int] | None = None
        self._counts: Tensor | None = None

    @property
    def key(self) -> str:
        return f"{self.prefix}/acc"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # what can be told before any step: a module with no features to read, too few classes
        check_feature_hook(pl_module, "KNNMonitor")
        check_num_classes(trainer, self.num_classes, "KNNMonitor")
        directions = getattr(pl_module, "metric_directions", None)
        if isinstance(directions, dict):
            directions[self.key] = True

    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # -- the bank ------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._features, self._labels, self._stored = [], [], 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_labelled(batch, "KNNMonitor", "training")  # before the step, also in epochs that fill no bank

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            return
        if self.max_bank_size is not None and self._stored >= self.max_bank_size:
            return
        features, labels = batch_features(pl_module, outputs, batch, self.feature_key)
        if labels is None:
            raise ValueError("KNNMonitor needs labelled training batches ((views, labels)) to fill its bank")
        keep = labels >= 0
        features, labels = features[keep], labels[keep]
        if self.max_bank_size is not None:
            room = self.max_bank_size - self._stored
            features, labels = features[:room], labels[:room]
        self._features.append(features)
        self._labels.append(labels)
        self._stored += len(labels)

    def build_bank(self, device: torch.device) -> tuple[Tensor, Tensor, int] | None:
        """The gathered, normalized bank ``(features, labels, num_classes)``, or None when it is empty."""
        if self._features:
            features, labels = torch.cat(self._features), torch.cat(self._labels).long()
        else:  # this rank saw no labelled sample; it still takes part in the gathers
            features, labels = torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
        width = int(max_over_ranks(torch.tensor(features.shape[1] if len(features) else 0, device=device)))
        if width == 0:
            return None
        if len(features) == 0:
            features = torch.zeros(0, width, device=device)
        features = gather_rows(F.normalize(features.to(device), dim=1))
        labels = gather_rows(labels.to(device))
        if len(labels) == 0:
            return None
        num_classes = self.num_classes if self.num_classes is not None else int(labels.max()) + 1
        return features, labels, num_classes

    # -- evaluation --------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bank, self._counts = None, None
        if trainer.sanity_checking or not self._due(trainer):
            return
        self._bank = self.build_bank(pl_module.device)
        self._counts = torch.zeros(2, device=pl_module.device)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        check_labelled(batch, "KNNMonitor", "validation")  # in the sanity check already, before any step

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._bank is None or self._counts is None:
            return
        features, labels = batch_features(pl_module, outputs, batch, self.feature_key)
        if labels is None:
            raise ValueError("KNNMonitor needs labelled validation batches (images, labels)")
        keep = labels >= 0
        if not bool(keep.any()):
            return
        bank, bank_labels, num_classes = self._bank
        scores = weighted_knn_predict(features[keep], bank, bank_labels, num_classes, self.k, self.temperature)
        self._counts[0] += (scores.argmax(1) == labels[keep]).sum()
        self._counts[1] += keep.sum()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._counts is None:
            return
        if self._bank is not None:
            correct, total = sum_over_ranks(self._counts).tolist()
            if total > 0:
                # already summed over the ranks: every rank logs the same value
                pl_module.log(self.key, correct / total, prog_bar=True)
        self._bank, self._counts = None, None
