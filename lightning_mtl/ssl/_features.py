"""How the evaluation callbacks get features and labels out of any SSL LightningModule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mtl._modes import eval_mode
from lightning_mtl.ssl.barlow_twins import split_views


def feature_extractor(pl_module: pl.LightningModule) -> Callable[[Tensor], Tensor]:
    """The module's representation: ``extract_features``, else its ``backbone`` / ``encoder``, else ``forward``."""
    for name in ("extract_features", "backbone", "encoder"):
        candidate = getattr(pl_module, name, None)
        if callable(candidate):
            return candidate
    return pl_module


def batch_features(
    pl_module: pl.LightningModule, outputs: Any, batch: Any, key: str = "features"
) -> tuple[Tensor, Tensor | None]:
    """Detached float32 features and the labels of a batch.

    The features are ``outputs[key]`` when the step returned them (the SSL modules of this package do),
    else the module's representation of the batch's first view, computed without gradients and in eval
    mode (a training-mode forward would update the BatchNorm statistics).
    """
    views, labels = split_views(batch)
    features = outputs.get(key) if isinstance(outputs, Mapping) else None
    if features is None:
        with eval_mode(pl_module), torch.no_grad():
            features = feature_extractor(pl_module)(views[0])
    if labels is not None:
        labels = labels.to(features.device)
    return features.detach().float().flatten(1), labels
