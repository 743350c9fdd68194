"""Mixed Barlow Twins as a LightningModule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl._hparams import save_init_hyperparameters
from lightning_mtl.ssl.barlow_twins import BarlowTwins
from lightning_mtl.ssl.losses import BarlowTwinsLossTerms, mixed_barlow_twins_loss

__all__ = ["MixedBarlowTwins"]


class MixedBarlowTwins(BarlowTwins):
    """Mixed Barlow Twins (Bandara, De Melo and Patel, "Guarding Barlow Twins Against Overfitting with
    Mixed Samples", 2023): Barlow Twins plus a regularizer that asks the embedding of a mixed input
    ``alpha * y_a + (1 - alpha) * y_b[pi]`` to correlate with both views as linear interpolation implies.

    Each training step draws ``alpha ~ Beta(*mix_beta)`` (the same on every DDP rank) and a permutation
    ``pi`` of this rank's batch, both from seeded generators keyed by ``(seed, global_step, batch_idx)``
    (and the rank, for ``pi``), so a resumed run draws what an uninterrupted one would. See
    :mod:`lightning_mtl.ssl.losses` for the loss, its targets (the README form of ``C_MB*``) and its
    DDP semantics. A step costs three forward / backward passes of the backbone instead of two.

    Logged: those of :class:`BarlowTwins` plus ``train/loss_reg`` (weighted, warm-up included),
    ``train/reg_scale`` (the warm-up factor) and ``train/alpha``.

    ``backbone``, ``embedding_dim``, ``projector_hidden``, ``lambda_bt``, ``feature_dim``, ``optimizer``,
    ``lr_scheduler``, ``warmup_epochs``, ``cosine``, ``final_lr_factor`` and ``eps`` are those of
    :class:`BarlowTwins`.

    Args:
        lambda_reg: weight of the regularizer relative to ``lambda_bt`` (4 for CIFAR-10/100 and
            Tiny-ImageNet, 2 for STL-10); 0 gives plain Barlow Twins (and skips the mixed forward).
        mix_beta: parameters of the Beta distribution of ``alpha`` ((1, 1): uniform, as published).
        reg_warmup_epochs: ramp the regularizer's weight linearly from 0 over this many epochs (the
            official ImageNet script uses 10; the CIFAR-scale recipes use none).
        seed: seed of the ``alpha`` / permutation draws.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int = 1024,
        projector_hidden: Sequence[int] = (512,),
        lambda_bt: float = 1 / 128,
        lambda_reg: float = 4.0,
        mix_beta: tuple[float, float] = (1.0, 1.0),
        reg_warmup_epochs: float = 0.0,
        seed: int = 0,
        feature_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_epochs: float = 10.0,
        cosine: bool = True,
        final_lr_factor: float = 1e-3,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(
            backbone, embedding_dim=embedding_dim, projector_hidden=projector_hidden, lambda_bt=lambda_bt,
            feature_dim=feature_dim, optimizer=optimizer, lr_scheduler=lr_scheduler, warmup_epochs=warmup_epochs,
            cosine=cosine, final_lr_factor=final_lr_factor, eps=eps,
        )  # fmt: skip
        if lambda_reg < 0:
            raise ValueError(f"lambda_reg must be >= 0, got {lambda_reg}")
        if len(mix_beta) != 2 or min(mix_beta) <= 0:
            raise ValueError(f"mix_beta must be two positive Beta parameters, got {list(mix_beta)}")
        if reg_warmup_epochs < 0:
            raise ValueError(f"reg_warmup_epochs must be >= 0, got {reg_warmup_epochs}")
        save_init_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"], logger=False)
        self.lambda_reg = float(lambda_reg)
        self.mix_beta = (float(mix_beta[0]), float(mix_beta[1]))
        self.reg_warmup_epochs = float(reg_warmup_epochs)
        self.seed = int(seed)
        self._last_mix: tuple[float, float] | None = None

    # -- the random draws ------------------------------------------------------------------------------
    def draw_mix(self, batch_size: int, step: int, batch_idx: int, rank: int) -> tuple[float, Tensor]:
        """``(alpha, perm)`` of a step: ``alpha`` depends on ``(seed, step, batch_idx)`` only (equal on all
        ranks), ``perm`` (a permutation of ``range(batch_size)``) on the rank too."""
        alpha = float(np.random.default_rng([self.seed, step, batch_idx]).beta(*self.mix_beta))
        key = np.random.SeedSequence([self.seed, step, batch_idx, rank]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(key))
        return alpha, torch.randperm(batch_size, generator=generator)

    def reg_scale(self, batch_idx: int) -> float:
        """Warm-up factor of the regularizer at ``batch_idx`` of the current epoch."""
        if self.reg_warmup_epochs == 0 or self._trainer is None:
            return 1.0
        per_epoch = max(1, int(self.trainer.num_training_batches))
        progress = self.current_epoch + batch_idx / per_epoch
        return min(1.0, progress / self.reg_warmup_epochs)

    # -- training --------------------------------------------------------------------------------
    def compute_loss(self, views: list[Tensor], batch_idx: int) -> tuple[BarlowTwinsLossTerms, Tensor]:
        self._last_mix = None
        if self.lambda_reg == 0 or len(views) < 2:
            return super().compute_loss(views, batch_idx)  # plain Barlow Twins (or the two-view error)
        y_a, y_b = views[0], views[1]
        step = self.global_step if self._trainer is not None else 0
        rank = self.global_rank if self._trainer is not None else 0
        alpha, perm = self.draw_mix(y_a.shape[0], step, batch_idx, rank)
        perm = perm.to(y_a.device)
        y_m = alpha * y_a + (1 - alpha) * y_b[perm]
        h_a, z_a = self.embed(y_a)
        _, z_b = self.embed(y_b)
        _, z_m = self.embed(y_m)
        scale = self.reg_scale(batch_idx)
        terms = mixed_barlow_twins_loss(
            z_a, z_b, z_m, alpha, perm, lambda_bt=self.lambda_bt, lambda_reg=self.lambda_reg * scale, eps=self.eps
        )
        self._last_mix = (alpha, scale)
        return terms, h_a.detach()

    def _log_terms(self, terms: BarlowTwinsLossTerms, batch_size: int) -> None:
        super()._log_terms(terms, batch_size)
        self.log("train/loss_reg", terms.loss_reg, batch_size=batch_size)
        if self._last_mix is not None:
            alpha, scale = self._last_mix
            self.log_dict({"train/reg_scale": scale, "train/alpha": alpha}, batch_size=batch_size)
