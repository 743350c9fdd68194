"""Two CPU processes (gloo): ranks stay identical and one DDP step equals the single-process step on
the concatenated batch; validation metrics are the metrics of the whole validation set."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from tests.helpers import tiny_multidigits, tiny_trainer


class _RanksAgree(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "parameters differ between ranks"


def _module():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(100, 16), nn.Tanh())  # no BatchNorm: per-rank statistics
    return MultiTaskModule(
        encoder=encoder,
        feature_dim=16,
        tasks={"left": ClassificationTask(10, weight=0.7), "right": ClassificationTask(10)},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )


@pytest.mark.slow
def test_ddp_step_equals_single_process_step_on_concatenated_batch():
    dm = tiny_multidigits(batch_size=8)
    module = _module()
    start = copy.deepcopy(module)
    trainer = tiny_trainer(
        strategy="ddp_spawn", devices=2, max_steps=1, limit_val_batches=1.0, num_sanity_val_steps=0,
        callbacks=[_RanksAgree()],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    ddp_val_acc = float(trainer.callback_metrics["val/left/acc"])

    # single process: the first 16 samples of epoch 0's order are what the two ranks saw (8 each)
    dm.setup("fit")
    order = dm.train_dataloader().sampler.permutation()[:16]
    x = torch.stack([dm.train_set[i][0] for i in order])
    y = {t: torch.stack([dm.train_set[i][1][t] for i in order]) for t in ("left", "right")}
    optimizer = torch.optim.SGD(start.parameters(), lr=0.5)
    start.training_step((x, y), 0).backward()
    optimizer.step()
    for (name, p_ddp), p_single in zip(module.named_parameters(), start.parameters()):
        assert torch.allclose(p_ddp, p_single, atol=1e-6), name

    # validation accuracy under DDP = accuracy over the full validation set
    single = tiny_trainer(num_sanity_val_steps=0)
    single.validate(module, datamodule=dm, verbose=False)
    assert float(single.callback_metrics["val/left/acc"]) == pytest.approx(ddp_val_acc)


@pytest.mark.slow
def test_ddp_regression_task_trains_and_ranks_agree():
    torch.manual_seed(0)
    module = MultiTaskModule(
        encoder=nn.Sequential(nn.Flatten(), nn.Linear(100, 8)), feature_dim=8,
        tasks={"left": ClassificationTask(10), "right": RegressionTask()},
    )  # fmt: skip

    class _AsRegression(pl.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.inner = tiny_multidigits(batch_size=16)
            self.task_names = ("left", "right")

        def setup(self, stage):
            self.inner.setup(stage)

        def _wrap(self, loader):
            return [(x, {"left": y["left"], "right": y["right"].float()}) for x, y in loader]

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self._wrap(self.inner.train_dataloader()), batch_size=None)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(self._wrap(self.inner.val_dataloader()), batch_size=None)

    trainer = tiny_trainer(strategy="ddp_spawn", devices=2, max_steps=3, callbacks=[_RanksAgree()])
    trainer.fit(module, datamodule=_AsRegression())
    assert "val/right/mae" in trainer.callback_metrics
