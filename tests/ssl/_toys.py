"""Tiny SSL-shaped modules and data for the evaluation-callback tests: fixed features, known answers."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def clusters(n: int, num_classes: int = 4, dim: int = 8, noise: float = 1.0, seed: int = 0):
    """Gaussian clusters around random centres: ``(x [n, dim], y [n])``."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, dim, generator=generator)
    y = torch.arange(n) % num_classes
    return centres[y] + noise * torch.randn(n, dim, generator=generator), y


class _TwoViewSet(TensorDataset):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return (x, x), y


class ToyData(pl.LightningDataModule):
    """Training batches ``((x, x), y)``, validation / test batches ``(x, y)``; no shuffling."""

    def __init__(self, n_train=96, n_val=48, batch_size=16, num_classes=4, unlabelled_every=0):
        super().__init__()
        self.x_train, self.y_train = clusters(n_train, num_classes, seed=0)
        self.x_val, self.y_val = clusters(n_val, num_classes, seed=1)
        if unlabelled_every:
            self.y_train = self.y_train.clone()
            self.y_train[::unlabelled_every] = -1
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(_TwoViewSet(self.x_train, self.y_train), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=self.batch_size)

    def test_dataloader(self):
        return self.val_dataloader()


class FixedFeatureModule(pl.LightningModule):
    """A fixed linear 'backbone' (never changes: its loss has zero gradient); with ``return_features`` its
    steps hand the features to the callbacks like the SSL modules do, else the callbacks compute them."""

    def __init__(self, dim=8, feature_dim=6, return_features=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(dim, feature_dim)
        self.feature_dim = feature_dim
        self.return_features = return_features
        self.metric_directions = {}

    def training_step(self, batch, batch_idx):
        (x, _), _ = batch
        features = self.backbone(x)
        loss = 0.0 * features.sum()
        return {"loss": loss, "features": features} if self.return_features else loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        return {"features": self.backbone(x)} if self.return_features else None

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class CountingModule(FixedFeatureModule):
    """Counts its training steps; ``hook=False`` renames the backbone so the module has no feature hook."""

    def __init__(self, hook=True, **kwargs):
        super().__init__(return_features=False, **kwargs)
        if not hook:
            self.net = self.backbone
            del self.backbone
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x = batch[0][0] if isinstance(batch[0], (list, tuple)) else batch[0]  # ((x, x), y) or [x]
        return (getattr(self, "net", None) or self.backbone)(x).sum()  # a real gradient: SGD would move the weights

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class UnlabelledTrainData(ToyData):
    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x_train), batch_size=self.batch_size)  # batches [x]: no labels
