"""Every process the tests spawn for DDP has destroyed its gloo process group, and freed it, before the
interpreter finalizes (see ``tests/fixtures/ddp.py`` for the abort this prevents)."""

from __future__ import annotations

import atexit
import pathlib

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from tests.fixtures.ddp import SpawnDDP, spawn_ranks
from tests.fixtures.trainers import tiny_trainer

TESTS = pathlib.Path(__file__).resolve().parents[1]


def _record_at_exit(path: str) -> None:
    """What the exit handlers see, written when the process finalizes (after the test's own code)."""
    atexit.register(lambda: pathlib.Path(path).write_text(str(dist.is_initialized())))


class _Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _RecordExit(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        _record_at_exit(f"{self.folder}/rank{trainer.global_rank}")


def _data():
    return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=2)


def _fit_with_ddp(rank, folder):
    _record_at_exit(f"{folder}/rank{rank}")
    tiny_trainer(strategy="ddp", devices=2, max_steps=2).fit(_Linear(), _data())


def _at_exit(folder):
    return sorted((p.name, p.read_text()) for p in pathlib.Path(folder).iterdir())


@pytest.mark.slow
def test_ddp_spawn_processes_destroy_their_group_before_exit(tmp_path):
    tiny_trainer(strategy=SpawnDDP(), devices=2, max_steps=2, callbacks=[_RecordExit(tmp_path)]).fit(_Linear(), _data())
    assert _at_exit(tmp_path) == [("rank0", "False"), ("rank1", "False")]


@pytest.mark.slow
def test_spawned_ranks_destroy_their_group_before_exit(tmp_path):
    spawn_ranks(_fit_with_ddp, (str(tmp_path),))
    assert _at_exit(tmp_path) == [("rank0", "False"), ("rank1", "False")]


def test_no_test_uses_the_plain_spawn_strategy():
    """``strategy="ddp_spawn"`` exits with the group alive: the tests use :class:`SpawnDDP` instead."""
    offenders = [
        str(path.relative_to(TESTS))
        for path in TESTS.rglob("*.py")
        if 'strategy="ddp_spawn"' in path.read_text() and path.name != pathlib.Path(__file__).name
    ]
    assert offenders == []
