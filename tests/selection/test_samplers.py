"""Multi-task samplers: exact per-epoch proportions, every sample once where promised, disjoint DDP shares,
mid-epoch resume (sampler and through Lightning checkpoints), and a MultiTaskModule fit on two tasks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from lightning_mtl import ClassificationTask, MultiTaskModule
from lightning_mtl._constants import MISSING_LABEL
from lightning_mtl.selection import (
    MultiTaskBatchSampler,
    MultiTaskSampling,
    TaskBatch,
    largest_remainder,
    list_task_schedules,
)
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

SIZES = [10, 25, 7]


def _task_of(index: int, sizes=SIZES) -> int:
    return int(np.searchsorted(np.cumsum(sizes), index, side="right"))


@pytest.mark.parametrize("schedule", list_task_schedules())
def test_every_schedule_gives_single_task_batches_of_the_epoch_length(schedule):
    sampler = MultiTaskBatchSampler(SIZES, batch_size=4, schedule=schedule, alpha=0.5, num_epochs=3, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 7 + 2
        tasks = [{_task_of(i) for i in batch} for batch in batches]
        assert all(len(t) == 1 for t in tasks)
        assert all(1 <= len(b) <= 4 for b in batches)
        counts = Counter(t.pop() for t in tasks)
        assert [counts[t] for t in range(3)] == sampler.counts(epoch).tolist()


def test_largest_remainder_by_hand():
    # 7 * [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4]: floors [3, 2, 1], one left for the largest remainder (0.5)
    assert largest_remainder([5, 3, 2], 7).tolist() == [4, 2, 1]
    assert largest_remainder([0, 0], 3).tolist() == [2, 1]  # all zero: equal shares, ties to the lower index
    with pytest.raises(ValueError, match="non-negative"):
        largest_remainder([1, -1], 3)


def test_temperature_proportions_are_exact_per_epoch():
    sizes = [400, 100, 25]
    sampler = MultiTaskBatchSampler(sizes, batch_size=5, schedule="temperature", alpha=0.5)
    steps = 80 + 20 + 5
    # p ∝ sqrt(n) = [20, 10, 5] / 35 of 105 steps = [60, 30, 15], integers already
    assert sampler.counts(0).tolist() == [60, 30, 15]
    seen = Counter()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        seen.update(_task_of(b[0], sizes) for b in sampler)
    assert [seen[t] for t in range(3)] == [240, 120, 60] and sum(seen.values()) == 4 * steps


def test_annealed_goes_from_proportional_to_uniform():
    sizes = [300, 60, 30]
    sampler = MultiTaskBatchSampler(sizes, batch_size=10, schedule="annealed", alpha=0.0, num_epochs=5)
    assert sampler.counts(0).tolist() == [30, 6, 3]  # exponent 1: proportional
    assert sampler.counts(4).tolist() == [13, 13, 13]  # exponent 0: uniform over the 39 steps
    middle = sampler.counts(2)  # exponent 0.5: sqrt sizes [17.3, 7.7, 5.5] / 30.5 of 39
    assert middle.tolist() == largest_remainder(np.sqrt(sizes), 39).tolist()


@pytest.mark.parametrize("schedule", ["proportional", "round_robin"])
def test_every_sample_once_per_epoch(schedule):
    sampler = MultiTaskBatchSampler(SIZES, batch_size=4, schedule=schedule, seed=3)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        flat = [i for b in sampler for i in b]
        assert sorted(flat) == list(range(sum(SIZES)))
        orders.append(flat)
    assert orders[0] != orders[1]  # a new permutation each epoch


def test_round_robin_order_by_hand():
    sampler = MultiTaskBatchSampler(SIZES, batch_size=4, schedule="round_robin")
    # batches per task [3, 7, 2]: turns 0 1 2 | 0 1 2 | 0 1 | 1 | 1 | 1 | 1
    assert sampler.task_order(0).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("schedule", ["proportional", "temperature"])
def test_ddp_shares_are_disjoint_and_ranks_take_the_same_task(schedule):
    world, sizes = 3, [24, 60, 12]  # every task a multiple of the global batch: no padding
    ranks = [MultiTaskBatchSampler(sizes, 4, schedule=schedule, alpha=0.3, rank=r, world_size=world, seed=5)
             for r in range(world)]  # fmt: skip
    single = MultiTaskBatchSampler(sizes, 12, schedule=schedule, alpha=0.3, seed=5)
    for epoch in range(2):
        for s in (*ranks, single):
            s.set_epoch(epoch)
        for step, (*shares, whole) in enumerate(zip(*ranks, single)):
            assert len({_task_of(i, sizes) for share in shares for i in share}) == 1, step
            union = [i for share in shares for i in share]
            assert len(union) == len(set(union)) == 12
            assert sorted(union) == sorted(whole)  # the shares split the one-process batch
    if schedule == "proportional":
        ranks[0].set_epoch(0), ranks[1].set_epoch(0), ranks[2].set_epoch(0)
        seen = sorted(i for s in ranks for b in s for i in b)
        assert seen == list(range(sum(sizes)))


def test_ddp_pads_a_partial_last_batch_to_equal_shares():
    ranks = [MultiTaskBatchSampler([5], 2, rank=r, world_size=2) for r in range(2)]
    shares = [list(s) for s in ranks]
    assert [len(b) for b in shares[0]] == [len(b) for b in shares[1]] == [2, 1]
    seen = [i for s in shares for b in s for i in b]
    assert set(seen) == set(range(5)) and len(seen) == 6  # one sample padded


def test_sampler_skip_resumes_inside_the_epoch():
    sampler = MultiTaskBatchSampler(SIZES, 4, schedule="temperature", alpha=0.5, seed=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip(1, 5)
    assert list(sampler) == full[5:]
    assert list(sampler) == full  # the skip applies once
    sampler.skip(1, 5)
    sampler.set_epoch(2)  # a checkpoint at an epoch's end: the next epoch starts at its beginning
    assert len(list(sampler)) == len(sampler)


def test_errors_are_one_sentence():
    with pytest.raises(ValueError, match="unknown task schedule 'propotional'; did you mean proportional"):
        MultiTaskBatchSampler(SIZES, 4, schedule="propotional")
    with pytest.raises(ValueError, match="at least one sample"):
        MultiTaskBatchSampler([3, 0], 4)
    with pytest.raises(ValueError, match="drop_last=True"):
        MultiTaskBatchSampler([3, 10], 4, drop_last=True)


# --- the data module ----------------------------------------------------------------------------------
def _task_data(n: int, seed: int, flip: bool) -> TensorDataset:
    """Separable two-class data: the class is the sign of the first (or, flipped, the second) pixel."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, 8, 8, generator=g)  # weak noise elsewhere: few samples suffice
    x[:, 0, 0, :2] *= 10
    y = (x[:, 0, 0, 1 if flip else 0] > 0).long()
    return TensorDataset(x, y)


class _TwoTasks(pl.LightningDataModule):
    def __init__(self, n: int, seed: int, flip: bool) -> None:
        super().__init__()
        self.train, self.val = _task_data(n, seed, flip), _task_data(64, seed + 100, flip)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=8)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val, batch_size=8)


def _module() -> MultiTaskModule:
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    return MultiTaskModule(encoder, {"a": ClassificationTask(2), "b": ClassificationTask(2)}, feature_dim=16,
                           optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))  # fmt: skip


def _sampling(**kwargs) -> MultiTaskSampling:
    tasks = {"a": _TwoTasks(96, 0, False), "b": _TwoTasks(40, 1, True)}
    return MultiTaskSampling(tasks, **{"batch_size": 8, "schedule": "temperature", "alpha": 0.5, **kwargs})


def test_batches_carry_every_task_key_with_the_others_missing():
    dm = _sampling()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, TaskBatch) and batch.task in ("a", "b")
    other = "b" if batch.task == "a" else "a"
    assert (batch.targets[other] == MISSING_LABEL).all() and (batch.targets[batch.task] >= 0).all()
    val = list(dm.val_dataloader())
    assert [b.task for b in val] == ["a"] * 8 + ["b"] * 8  # every validation sample once, task by task

    floats = MultiTaskSampling({"r": TensorDataset(torch.randn(6, 2), torch.randn(6, 3)),
                                "c": TensorDataset(torch.randn(4, 2), torch.arange(4))}, batch_size=2)  # fmt: skip
    floats.setup("fit")
    batches = list(floats.train_dataloader())
    c_batch = next(b for b in batches if b.task == "c")
    assert c_batch.targets["r"].shape == (2, 3) and torch.isnan(c_batch.targets["r"]).all()


class _Record(Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        labelled = [name for name, y in batch.targets.items() if (y >= 0).any()]
        assert labelled == [batch.task]
        self.batches.append((trainer.current_epoch, batch.task, round(float(batch.inputs.sum()), 4)))


def test_multitask_module_fits_two_tasks_with_the_sampler():
    pl.seed_everything(0)
    module, record = _module(), _Record()
    trainer = tiny_trainer(max_epochs=6, callbacks=[record], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=_sampling())
    # temperature 0.5: 12 and 5 batches -> sqrt sizes 96, 40 -> [10, 7] of 17 steps per epoch
    assert Counter(t for _, t, _ in record.batches) == {"a": 60, "b": 42}
    metrics = trainer.callback_metrics
    assert metrics["val/a/acc"] > 0.8 and metrics["val/b/acc"] > 0.8  # both heads learned their own task


def test_fit_resumed_mid_epoch_sees_the_remaining_batches(tmp_path):
    def run(ckpt_path=None, seed=0):
        pl.seed_everything(seed)
        record = _Record()
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
        trainer = tiny_trainer(max_epochs=2, callbacks=[record, saver], enable_checkpointing=True,
                               limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
        trainer.fit(_module(), datamodule=_sampling(), ckpt_path=ckpt_path)
        return record.batches, trainer

    full, _ = run()
    assert len(full) == 34
    for step in (5, 20):  # inside the first epoch, inside the second
        resumed, trainer = run(tmp_path / f"step={step}.ckpt", seed=123)
        assert resumed == full[step:], step
        assert trainer.global_step == 34


@pytest.mark.parametrize("recipe", ["multitask_sampling", "lasso"])
def test_the_recipes_run_through_the_cli(recipe, tmp_path, monkeypatch):
    from lightning_mtl.cli import main

    monkeypatch.chdir(tmp_path)  # the run summary goes to the working directory
    config = Path(__file__).resolve().parents[2] / f"configs/selection/{recipe}.yaml"
    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--trainer.logger=false"])  # fmt: skip
    assert cli.trainer.global_step == 1


# --- DDP: two gloo processes ----------------------------------------------------------------------------
WORLD = 2


class _Indexed(torch.utils.data.Dataset):
    """Inputs that name their sample: ``x = offset + index`` everywhere."""

    def __init__(self, n: int, offset: int) -> None:
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 8, 8), float(self.offset + i)), torch.tensor(i % 2)


def _indexed_sampling() -> MultiTaskSampling:
    tasks = {"a": _Indexed(48, 0), "b": _Indexed(20, 1000)}
    return MultiTaskSampling(tasks, batch_size=4, schedule="temperature", alpha=0.5, seed=4)


class _Samples(Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[str, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((batch.task, batch.inputs[:, 0, 0, 0].long().tolist()))


def _ddp_worker(rank, folder, port):
    from tests.fixtures.ddp import join_processes

    join_processes(rank, WORLD, port)
    record = _Samples()
    trainer = tiny_trainer(strategy="ddp", devices=WORLD, max_epochs=2, callbacks=[record], limit_val_batches=0,
                           num_sanity_val_steps=0, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(_module(), datamodule=_indexed_sampling())
    # the Lasso budgets: rank 0 computes them, every rank samples by them
    from lightning_mtl.selection import ActiveSourceSelection, DigitsMLP, DigitsSources

    sources = DigitsSources(total_budget=200, batch_size=20)
    selection = ActiveSourceSelection()
    model = MultiTaskModule(DigitsMLP(), {name: ClassificationTask(2) for name in sources.source_names})
    trainer = tiny_trainer(strategy="ddp", devices=WORLD, max_epochs=1, callbacks=[selection], limit_val_batches=0,
                           num_sanity_val_steps=0, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(model, datamodule=sources)
    torch.save((record.steps, sources.budgets.tolist()), f"{folder}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_take_the_same_task_and_disjoint_shares_of_the_single_process_batches(tmp_path):
    """Also: the Lasso callback's budgets are the same on both ranks."""
    import torch.multiprocessing as mp

    from tests.fixtures.ddp import free_port

    mp.start_processes(_ddp_worker, args=(str(tmp_path), free_port()), nprocs=WORLD, start_method="spawn")
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ranks = [steps for steps, _ in saved]
    assert saved[0][1] == saved[1][1] and sum(saved[0][1]) == 200  # the same budgets on both ranks
    single = MultiTaskBatchSampler([48, 20], 8, schedule="temperature", alpha=0.5, seed=4)
    expected = []
    for epoch in range(2):
        single.set_epoch(epoch)
        expected += [[i if i < 48 else 1000 + i - 48 for i in batch] for batch in single]
    assert len(ranks[0]) == len(ranks[1]) == len(expected)
    for (task0, x0), (task1, x1), whole in zip(*ranks, expected):
        assert task0 == task1 and not set(x0) & set(x1)
        assert sorted(x0 + x1) == sorted(whole)
