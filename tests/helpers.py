"""Small builders shared by the tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one torch thread: tiny problems gain nothing from a second
    thread and lose much to it on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
