"""A tiny byte-level recurrent language model: the learner of the ZIP-FIT recipe."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ByteLM"]

PAD = 256  # the padding id of StdlibCorpus (bytes are 0..255)


class ByteLM(pl.LightningModule):
    """A one-layer GRU over UTF-8 bytes, trained with next-byte cross-entropy (padding ignored).

    Small enough to train in seconds on a CPU; it measures how well a selected training set prepares a
    model for a target distribution (the ZIP-FIT recipe's target loss is ``val/loss``, in nats per byte).
    Batches are dicts with ``"tokens"``: ``(batch, seq_len + 1)`` byte ids padded with 256.

    Args:
        embed_dim: byte embedding width.
        hidden_dim: GRU width.
        lr: Adam learning rate.
    """

    def __init__(self, embed_dim: int = 32, hidden_dim: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.embed = nn.Embedding(PAD + 1, embed_dim)
        self.rnn = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.out = nn.Linear(hidden_dim, PAD)
        self.metric_directions: dict[str, bool] = {"train/loss": False, "val/loss": False}  # {key: higher is better}

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-byte logits, ``(batch, length, 256)``."""
        hidden, _ = self.rnn(self.embed(tokens))
        return self.out(hidden)

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-byte cross-entropy over the non-padding targets."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, PAD).float(), tokens[:, 1:].reshape(-1), ignore_index=PAD)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch["tokens"])
        self.log("train/loss", loss, batch_size=len(batch["tokens"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch["tokens"]), batch_size=len(batch["tokens"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
