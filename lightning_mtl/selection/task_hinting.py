"""A small shared decoder-only transformer for sorting and its hint tasks, with exact-sequence accuracy."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mtl.selection.sorting_tasks import IGNORE, SORTING_TASKS, vocab_size

__all__ = ["TaskHintingTransformer", "exact_sequence_match"]


def exact_sequence_match(logits: Tensor, targets: Tensor) -> Tensor:
    """Per row, whether every answer token (targets other than ``-100``) is the argmax of its logits.

    Under teacher forcing this equals greedy decoding's exact match: if every step is right given the
    true prefix, greedy decoding writes that very prefix, and the first wrong step is wrong in both.

    Args:
        logits: ``[B, T, V]`` next-token scores.
        targets: ``[B, T]`` next-token targets, ``-100`` where ignored.

    Returns:
        ``[B]`` booleans.
    """
    answer = targets != IGNORE
    correct = (logits.argmax(-1) == targets) | ~answer
    return correct.all(dim=1)


def _sinusoid(length: int, width: int, device: torch.device) -> Tensor:
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : width // 2]
    return table


class TaskHintingTransformer(pl.LightningModule):
    """One decoder-only transformer trained on every task of the batch stream; task hinting changes the data only.

    Task hinting (Awasthi & Gupta, "Improving Length-Generalization in Transformers via Task Hinting",
    arXiv:2310.00726, 2023) trains the main task (sorting) jointly with a simpler auxiliary task (the
    successor of a queried element) on the same shared model; a task-id token at the start of each sequence
    tells the tasks apart. This module is the shared model: token embedding, optional sinusoidal positions
    (none by default: a causal decoder infers order itself, and learned absolute positions could not reach
    unseen lengths), ``num_layers`` pre-norm ``nn.TransformerEncoderLayer`` blocks under a causal mask, and a
    linear head over the vocabulary. The loss is next-token cross-entropy on the answer tokens only.

    Logged: ``train/<task>/loss`` for the task of each batch, ``val/sort/exact_len<n>`` and
    ``test/sort/exact_len<n>`` (exact-sequence accuracy per length bucket, see :func:`exact_sequence_match`).

    Args:
        num_values: size of the value alphabet (as the data module's).
        d_model: width of the residual stream.
        nhead: attention heads.
        num_layers: transformer blocks.
        dim_feedforward: hidden width of each block's MLP.
        dropout: dropout inside the blocks.
        positional: ``"none"`` or ``"sinusoidal"``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        num_values: int = 64,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 256,
        dropout: float = 0.0,
        positional: str = "none",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if positional not in ("none", "sinusoidal"):
            raise ValueError(f"unknown positional encoding {positional!r}; expected 'none' or 'sinusoidal'")
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size(num_values), d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True, activation="gelu"
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size(num_values))
        self.positional, self.lr, self.weight_decay = positional, float(lr), float(weight_decay)
        self.metric_directions: dict[str, bool] = {}  # {logged key: higher is better}, filled as buckets are logged

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``[B, T, V]`` of right-padded tokens ``[B, T]``."""
        h = self.embed(tokens)
        length = tokens.shape[1]
        if self.positional == "sinusoidal":
            h = h + _sinusoid(length, h.shape[-1], h.device).to(h.dtype)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))

    @staticmethod
    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over the answer tokens."""
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets, task = batch
        loss = self.loss(self(tokens), targets)
        # every batch holds one task (the data module's sampler); log under its name
        name = SORTING_TASKS[int(task[0])]
        self.log(f"train/{name}/loss", loss, batch_size=len(tokens))
        return loss

    def _bucket(self, stage: str, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None)
        lengths = getattr(datamodule, "bucket_lengths", None)
        return f"len{lengths(stage)[dataloader_idx]}" if lengths is not None else f"bucket{dataloader_idx}"

    def _evaluate(self, stage: str, batch: tuple[Tensor, Tensor, Tensor], dataloader_idx: int) -> None:
        tokens, targets, _ = batch
        exact = exact_sequence_match(self(tokens), targets).float().mean()
        key = f"{stage}/sort/exact_{self._bucket(stage, dataloader_idx)}"
        self.metric_directions[key] = True  # accuracies: BestMetricsSummary keeps the highest
        self.log(key, exact, batch_size=len(tokens), add_dataloader_idx=False)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
