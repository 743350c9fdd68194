"""A grid of mixed samples with their lambdas, sent through the logger's own image API."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["log_mixed_grid"]


def _to_unit_range(images: Tensor) -> Tensor:
    # inputs are usually normalized: stretch each image to [0, 1] for display
    flat = images.detach().float().flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    return ((flat - low[:, None]) / (high - low).clamp_min(1e-8)[:, None]).view_as(images).cpu()


def log_mixed_grid(
    trainer: pl.Trainer, key: str, images: Tensor, lambdas: Tensor, max_images: int = 16, nrow: int = 8
) -> bool:
    """Send up to ``max_images`` mixed images, captioned with their lambdas, to every logger that has an
    image API: W&B (``WandbLogger.log_image``, one captioned image each) and TensorBoard (one grid via
    ``add_image`` and the lambdas via ``add_text``). Runs on global rank 0 only; returns whether any
    logger took the images.

    Args:
        trainer: the running trainer (its loggers and global step).
        key: the image key, e.g. ``"train/mixed"``.
        images: ``[B, C, H, W]`` mixed images (any range; each is stretched to 0..255 uint8).
        lambdas: ``[B]`` or ``[B, k]`` mixing weights per image.
    """
    if trainer.global_rank != 0:
        return False
    count = min(max_images, images.shape[0])
    # uint8 pixels: W&B casts float pixels to uint8 as they are, which turns a [0, 1] picture black
    shown = (_to_unit_range(images[:count]) * 255).round().to(torch.uint8)
    weights = lambdas[:count].detach().float().cpu()
    weights = weights[:, None] if weights.ndim == 1 else weights
    captions = ["lam=" + "/".join(f"{w:.2f}" for w in row.tolist()) for row in weights]
    step = trainer.global_step
    logged = False
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=list(shown.permute(0, 2, 3, 1).numpy()), caption=captions, step=step)
            logged = True
        elif isinstance(logger, TensorBoardLogger):
            from torchvision.utils import make_grid

            logger.experiment.add_image(key, make_grid(shown, nrow=nrow, padding=2), global_step=step)
            logger.experiment.add_text(key + "/lambdas", _table(captions, nrow), global_step=step)
            logged = True
    return logged


def _table(captions: Sequence[str], nrow: int) -> str:
    rows = [" | ".join(captions[i : i + nrow]) for i in range(0, len(captions), nrow)]
    return "  \n".join(rows)
