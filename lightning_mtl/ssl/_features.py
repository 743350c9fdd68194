"""How the evaluation callbacks get features and labels out of any SSL LightningModule."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mtl._modes import eval_mode
from lightning_mtl.ssl.barlow_twins import split_views


_FEATURE_HOOKS = ("extract_features", "backbone", "encoder")


def feature_extractor(pl_module: pl.LightningModule) -> Callable[[Tensor], Tensor]:
    """The module's representation: ``extract_features``, else its ``backbone`` / ``encoder``, else ``forward``."""
    for name in _FEATURE_HOOKS:
        candidate = getattr(pl_module, name, None)
        if callable(candidate):
            return candidate
    return pl_module


def check_feature_hook(pl_module: nn.Module, owner: str) -> None:
    """Refuse, at setup, a module with no representation to read: no feature hook and no ``forward``."""
    if any(callable(getattr(pl_module, name, None)) for name in _FEATURE_HOOKS):
        return
    if type(pl_module).forward not in (pl.LightningModule.forward, nn.Module.forward):
        return
    raise ValueError(
        f"{owner} reads the module's features of an image batch through its `extract_features` method, its "
        f"`backbone` or `encoder` submodule, or its `forward`, and {type(pl_module).__name__} has none of "
        "them: add one, e.g. `def forward(self, x): return self.net(x)` returning the representation"
    )


def check_num_classes(trainer: pl.Trainer | None, num_classes: int | None, owner: str) -> None:
    """Refuse, at setup, fewer classes than the datamodule declares (its labels would fall outside)."""
    declared = getattr(getattr(trainer, "datamodule", None), "num_classes", None)
    if num_classes is not None and isinstance(declared, int) and num_classes < declared:
        raise ValueError(
            f"{owner}(num_classes={num_classes}) has fewer classes than the datamodule's num_classes={declared}: "
            f"give {owner} num_classes={declared}"
        )


def check_labelled(batch: Any, owner: str, split: str) -> None:
    """Refuse a batch without labels before the step runs (cheap: it only looks at the batch's structure)."""
    if split_views(batch)[1] is None:
        raise ValueError(
            f"{owner} needs labelled {split} batches ((views, labels) or (images, labels)), and the {split} "
            "dataloader yields none: give the datamodule labels (negative ones are left out) or drop the callback"
        )


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
