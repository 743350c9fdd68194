"""Hyperparameters that rebuild a module from its checkpoint alone."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import lightning.pytorch as pl

# set by LightningCLI while it builds the model: the resolved config (class paths and init args)
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters


def save_init_hyperparameters(module: pl.LightningModule, objects: Iterable[str], logger: bool = True) -> None:
    """``module.save_hyperparameters()`` for a module that takes injected objects (encoders, tasks,
    optimizer factories). Built by the CLI, every argument is kept: the objects are then their class
    paths and init args, from which ``load_from_checkpoint(path)`` rebuilds them (Lightning's CLI
    instantiator). Built in Python, the ``objects`` are left out (their weights are in the state dict
    and they need not be serialisable), so ``load_from_checkpoint(path, encoder=..., tasks=...)``
    must be given them, as Lightning documents for ignored arguments."""
    from_cli = _given_hyperparameters.get() is not None
    frame = inspect.currentframe()
    module.save_hyperparameters(ignore=[] if from_cli else list(objects), logger=logger, frame=frame and frame.f_back)
