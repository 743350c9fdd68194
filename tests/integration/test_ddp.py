"""Two CPU processes (gloo): ranks stay identical and one DDP step equals the single-process step on
the concatenated batch; validation metrics are the metrics of the whole validation set."""

from __future__ import annotations

import copy
import functools
import inspect

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.aggregators import create_aggregator, get_aggregator_class, list_aggregators
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_multidigits, tiny_trainer


class _RanksAgree(pl.Callback):
    """Parameters and floating-point state (aggregator buffers included) are equal on both ranks."""

    def on_train_end(self, trainer, pl_module):
        state = [t for t in pl_module.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        flat = torch.cat([t.detach().float().flatten() for t in state])
        gathered = pl_module.all_gather(flat)
        assert torch.equal(gathered[0], gathered[1]), "parameters differ between ranks"


class _SaveBatch(pl.Callback):
    """Records the batch each rank trains on, for the single-process replay."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch, self.folder / f"batch_rank{trainer.global_rank}.pt")


GRADIENT_METHODS = [n for n in list_aggregators() if create_aggregator(n).kind != "loss"]
GRAMIAN_METHODS = [n for n in GRADIENT_METHODS if create_aggregator(n).kind == "gramian"]


def _module(aggregator="ls", gradient_mode="parameter", fmtl=None):
    if "seed" in inspect.signature(get_aggregator_class(aggregator)).parameters:
        aggregator = create_aggregator(aggregator, seed=0)  # the same random draws on every rank
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(100, 16), nn.Tanh())  # no BatchNorm: per-rank statistics
    return MultiTaskModule(
        encoder=encoder,
        feature_dim=16,
        tasks={"left": ClassificationTask(10, weight=0.7), "right": ClassificationTask(10)},
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        aggregator=aggregator,
        gradient_mode=gradient_mode,
        fmtl=fmtl,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "aggregator, mode",
    [("ls", "parameter"), ("uw", "parameter"), ("rlw", "parameter"), ("dwa", "parameter")]
    + [(name, "parameter") for name in GRADIENT_METHODS]
    + [(name, "representation") for name in ("mgda", "nashmtl", "upgrad")],
)
def test_ddp_step_equals_single_process_step_on_concatenated_batch(tmp_path, aggregator, mode):
    """Loss weighting: DDP's own gradient averaging. Parameter level: the engine averages the
    Jacobian over ranks. Representation level: the m x m Gramian is reduced over ranks."""
    _check_ddp_step(tmp_path, _module(aggregator, mode))


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["ls", "uw", "pcgrad", "nashmtl"])
def test_fmtl_ddp_step_equals_single_process_step_on_concatenated_batch(tmp_path, aggregator):
    """F-MTL perturbs with the rank-averaged gradients and averages the perturbed ones: the DDP step is
    the single-process step on the concatenated batch (no m-sharpness)."""
    from lightning_mtl.sharpness.fmtl import FMTL

    _check_ddp_step(tmp_path, _module(aggregator, fmtl=FMTL(rho=0.3, adaptive=aggregator == "pcgrad")))


def _check_ddp_step(tmp_path, module):
    dm = tiny_multidigits(batch_size=8)
    start = copy.deepcopy(module)
    trainer = tiny_trainer(
        strategy=SpawnDDP(), devices=2, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
        callbacks=[_RanksAgree(), _SaveBatch(tmp_path)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    ddp_val_acc = float(trainer.callback_metrics["val/left/acc"])

    # single process, one step on the two ranks' batches (8 samples each) put together
    parts = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    assert not torch.equal(parts[0][0], parts[1][0]), "both ranks saw the same samples"
    x = torch.cat([p[0] for p in parts])
    y = {t: torch.cat([p[1][t] for p in parts]) for t in ("left", "right")}
    optimizer = torch.optim.SGD(start.parameters(), lr=0.5)
    start.backward(start.training_step((x, y), 0))
    optimizer.step()
    for (name, p_ddp), p_single in zip(module.named_parameters(), start.parameters()):
        assert torch.allclose(p_ddp, p_single, atol=1e-6), name

    # validation accuracy under DDP = accuracy over the full validation set
    single = tiny_trainer(num_sanity_val_steps=0)
    single.validate(module, datamodule=dm, verbose=False)
    assert float(single.callback_metrics["val/left/acc"]) == pytest.approx(ddp_val_acc)


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


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["famo", "gradnorm", "uw", "dwa"])
def test_ddp_stateful_loss_weightings_stay_identical_on_every_rank(aggregator):
    """Their updates use per-rank losses averaged over ranks (FAMO, DWA) or DDP-averaged gradients
    (GradNorm, UW): every rank holds the same weights after training."""
    module = _module(aggregator)
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_epochs=2, limit_train_batches=3,
                           limit_val_batches=1, callbacks=[_RanksAgree()])  # fmt: skip
    trainer.fit(module, datamodule=tiny_multidigits(batch_size=8))


@pytest.mark.slow
def test_ddp_regression_task_trains_and_ranks_agree():
    torch.manual_seed(0)
    module = MultiTaskModule(
        encoder=nn.Sequential(nn.Flatten(), nn.Linear(100, 8)), feature_dim=8,
        tasks={"left": ClassificationTask(10), "right": RegressionTask()},
    )  # fmt: skip

    trainer = tiny_trainer(
        strategy=SpawnDDP(), devices=2, max_epochs=1, limit_train_batches=3, callbacks=[_RanksAgree()]
    )
    trainer.fit(module, datamodule=_AsRegression())
    assert "val/right/mae" in trainer.callback_metrics
