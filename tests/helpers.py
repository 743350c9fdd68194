"""Small builders shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_mtl import ClassificationTask, DigitsCNN, MultiDigits, MultiTaskModule


def tiny_multidigits(**kwargs) -> MultiDigits:
    defaults = dict(num_train=256, num_val=64, num_test=64, batch_size=32, seed=0)
    defaults.update(kwargs)
    return MultiDigits(**defaults)


def tiny_module(**kwargs) -> MultiTaskModule:
    defaults = dict(
        encoder=DigitsCNN(channels=(8, 16), out_features=32),
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
    )
    defaults.update(kwargs)
    return MultiTaskModule(**defaults)


def tiny_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)
