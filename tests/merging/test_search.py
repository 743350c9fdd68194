"""The coefficient search: one trainer.validate per candidate, the best kept by metric and mode."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.merging import TaskVector, search_coefficient


class Scalar(pl.LightningModule):
    """One weight ``w``; validation logs ``(w - 0.7)^2``, so the best coefficient is known in advance."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def validation_step(self, batch, batch_idx):
        self.log("val/dist", (self.w - 0.7) ** 2)


def _search(mode: str, metric: str = "val/dist"):
    module = Scalar()
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)
    tau = TaskVector({"w": torch.tensor(1.0)})
    return module, search_coefficient(
        module, tau, [0.0, 0.5, 0.7, 1.0], trainer, dataloaders=loader, metric=metric, mode=mode
    )


def test_the_search_validates_every_candidate_and_keeps_the_best():
    module, found = _search("min")
    assert found.best_coef == 0.7 and found.best_value == pytest.approx(0.0, abs=1e-12)
    assert list(found.scores) == [0.0, 0.5, 0.7, 1.0]
    assert found.scores[0.5] == pytest.approx(0.04) and found.scores[1.0] == pytest.approx(0.09)
    assert module.w.item() == pytest.approx(0.7)  # the module is left holding the best merge
    module, found = _search("max")
    assert found.best_coef == 0.0 and module.w.item() == 0.0


def test_the_search_names_a_metric_that_was_not_logged():
    with pytest.raises(ValueError, match="validation logged no 'val/acc'; logged keys: val/dist"):
        _search("max", metric="val/acc")
