"""How evaluation callbacks get features and labels out of any LightningModule (floor 0: imports no family).

The SSL callbacks (kNN monitor, online linear probe) read batches and representations through these;
:func:`split_views` is also the SSL modules' batch reader."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_mtl._modes import eval_mode

_FEATURE_HOOKS = ("extract_features", "backbone", "encoder")


def split_views(batch: Any) -> tuple[list[Tensor], Tensor | None]:
    """``(views, labels)`` of an SSL batch.

    Accepted: ``((view_a, view_b, ...), labels)`` (what a DataModule with a
    :class:`~lightning_mtl.ssl.TwoViews` transform yields), ``(images, labels)`` (one view, e.g.
    validation), a bare tensor or a tuple of views without labels. Labels given as ``{task: labels}``
    with one task are unpacked.
    """
    labels = None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not _is_views(batch):
        views, labels = batch
    else:
        views = batch
    if isinstance(labels, dict):
        if len(labels) != 1:
            raise ValueError(f"an SSL batch carries one label set, got {len(labels)}: {sorted(labels)}")
        labels = next(iter(labels.values()))
    if isinstance(views, Tensor):
        views = [views]
    if not isinstance(views, (tuple, list)) or not all(isinstance(v, Tensor) for v in views):
        raise TypeError(
            "an SSL batch must be ((view_a, view_b), labels) or (images, labels); give the DataModule a "
            "two-view train_transform such as lightning_mtl.ssl.TwoViews"
        )
    return list(views), labels


def _is_views(batch: Sequence[Any]) -> bool:
    """Two same-shape image tensors and no labels: a bare pair of views."""
    a, b = batch
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 3 and a.shape == b.shape


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
