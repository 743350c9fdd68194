"""On the embedded benchmark, seeded: moving the preference towards a task raises that task's accuracy."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl import ClassificationTask
from lightning_mtl.controllable import (
    BudgetSearch,
    ControllableMultiTaskModule,
    SlimmableDigitsCNN,
    controllability_grid,
    evaluate_configuration,
)
from tests.fixtures.trainers import one_thread, tiny_multidigits, tiny_trainer  # noqa: F401  # one_thread: autouse


@pytest.mark.slow
def test_preference_towards_a_task_raises_its_accuracy_on_multidigits():
    pl.seed_everything(0)
    module = ControllableMultiTaskModule(
        encoder=SlimmableDigitsCNN(channels=(8, 16), out_features=32),
        tasks={"left": ClassificationTask(10), "right": ClassificationTask(10)},
        decoder_widths=(0.125, 0.5, 1.0), decoder_hidden=32,
        optimizer=functools.partial(torch.optim.Adam, lr=5e-3),
    )  # fmt: skip
    data = tiny_multidigits(num_train=1536, num_val=512, batch_size=64)
    tiny_trainer(max_epochs=6, limit_val_batches=0, deterministic=True).fit(module, datamodule=data)
    batches = list(data.val_dataloader())
    search = BudgetSearch(module, batches[0][0][:1])
    for budget in (1.0, 0.6):  # encoder widths 1.0 and 0.75 (0.25 of these channels is too few to learn)
        left_first = evaluate_configuration(module, batches, search.search(budget, [0.9, 0.1]), "acc")
        right_first = evaluate_configuration(module, batches, search.search(budget, [0.1, 0.9]), "acc")
        assert left_first["left"] > right_first["left"], budget
        assert right_first["right"] > left_first["right"], budget
    grid = controllability_grid(module, batches, [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]], [0.6, 1.0], search=search)
    assert grid["mean_controllability"] > 0.5
