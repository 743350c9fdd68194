"""Two CPU processes (gloo): ``gradient_mode="gramian"`` under Lightning's ``strategy="ddp"`` gives every
rank the single-process step on the concatenated batch, for every Gramian weighting, through both
cross-rank schemes (rows gathered, per-task parameter gradients averaged) and the direct parameters.

One spawn of two processes trains every method in turn (see ``tests/fixtures/ddp.py``); each rank
takes two steps on rows ``rank::2`` of two fixed 16-row batches and saves its state and Gramian.
"""

from __future__ import annotations

import functools
import inspect

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_mtl import ClassificationTask, MultiTaskModule, RegressionTask
from lightning_mtl.aggregators import GramianWeighting, create_aggregator, get_aggregator_class, list_aggregators
from lightning_mtl.multitask.gramian import gathers_rows, record_layers
from tests.fixtures.ddp import rank_case, spawn_and_collect
from tests.fixtures.trainers import one_thread, tiny_trainer  # noqa: F401

METHODS = sorted(n for n in list_aggregators() if isinstance(create_aggregator(n), GramianWeighting))
WORLD, BATCH, TASKS, STEPS = 2, 16, 3, 2


class _Encoder(nn.Module):
    """No batch statistics (DDP would normalise per rank); 8 rows per rank. Per layer, with m = 3 tasks
    on 2 ranks: ``small`` (40 parameters, large activations) and ``head`` (136) average their per-task
    gradients, ``wide`` (6,304 parameters, 2 x 2 outputs) and ``fc`` gather the rows (a convolution and
    a linear layer each way), as does ``back``; ``norm`` takes direct per-task gradients; ``head`` is called
    twice."""

    out_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(1, 4, 3)  # 10 x 10 -> 8 x 8
        self.wide = nn.Conv2d(4, 32, 7)  # 8 x 8 -> 2 x 2
        self.fc = nn.Linear(128, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 8)
        self.back = nn.Linear(8, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.wide(torch.tanh(self.small(x))))
        h = torch.tanh(self.norm(self.fc(h.flatten(1))))
        return torch.tanh(self.head(torch.tanh(self.back(torch.tanh(self.head(h)))) + h))


def _module(name):
    aggregator = name
    if "seed" in inspect.signature(get_aggregator_class(name)).parameters:
        aggregator = create_aggregator(name, seed=0)  # the same random draws on every rank
    torch.manual_seed(0)
    return MultiTaskModule(
        encoder=_Encoder(),
        tasks={"left": ClassificationTask(10, weight=0.7), "right": ClassificationTask(10), "sum": RegressionTask()},
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        aggregator=aggregator,
        gradient_mode="gramian",
    )


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 1, 10, 10, generator=g)
    left, right = torch.randint(0, 10, (BATCH,), generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    return x, {"left": left, "right": right, "sum": (left + right).float() / 10}


class _FixedBatch(pl.LightningDataModule):
    """``STEPS`` fixed batches; rank ``r`` of ``w`` gets rows ``r::w`` of each (a single process: all)."""

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = [_batch(seed) for seed in range(1, STEPS + 1)]
        return DataLoader(
            [(x[rank::world], {k: v[rank::world] for k, v in y.items()}) for x, y in batches], batch_size=None
        )


def _fit(module, **trainer_kwargs):
    trainer = tiny_trainer(
        max_steps=STEPS, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, **trainer_kwargs
    )
    trainer.fit(module, datamodule=_FixedBatch())
    assert trainer.global_step == STEPS


def _worker(rank, folder):
    for name in METHODS:
        with rank_case(folder, name, rank):
            module = _module(name)
            _fit(module, strategy="ddp", devices=WORLD)
            saved = {"state": module.state_dict(), "gramian": module.engine.last_gramian}
            torch.save(saved, f"{folder}/{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``name -> [what rank 0 saved, what rank 1 saved]``, or the error text."""
    folder = tmp_path_factory.mktemp("gramian_ddp")
    return spawn_and_collect(_worker, (str(folder),), folder, list(METHODS), world=WORLD)


def test_the_encoder_takes_both_cross_rank_schemes():
    """What the DDP test covers: per layer, the scheme :func:`gathers_rows` picks for one rank's 8 rows."""
    module = _module("mgda")
    x, _ = _batch()
    with record_layers(module.encoder) as layers:
        module.encoder(x[::WORLD])
    names = {id(m): n for n, m in module.encoder.named_modules()}
    chosen = {}
    for calls in layers:
        numel = sum(i.numel() + TASKS * o.numel() for i, o in zip(calls.inputs, calls.outputs))
        parameters = sum(p.numel() for p in calls.module.parameters())
        chosen[names[id(calls.module)]] = gathers_rows(numel, parameters, TASKS, WORLD)
    assert chosen == {"small": False, "wide": True, "fc": True, "head": False, "back": False}


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_ddp_gramian_step_equals_single_process_step_on_the_concatenated_batch(ranks, name):
    saved = ranks[name]
    if isinstance(saved, str):
        pytest.fail(f"{name} failed under DDP:\n{saved}")
    first, second = saved
    single = _module(name)
    initial = {k: v.clone() for k, v in single.state_dict().items() if isinstance(v, torch.Tensor)}
    _fit(single)
    # both ranks hold the same parameters and aggregator state, and the Gramian of the whole batch
    torch.testing.assert_close(first["state"], second["state"], rtol=0, atol=0)
    torch.testing.assert_close(first["gramian"], single.engine.last_gramian, rtol=1e-5, atol=1e-7)
    # ... and the updates of one process on the 16-row batches, to float32 round-off
    after = {k: v for k, v in single.state_dict().items() if k in initial and v.is_floating_point()}
    # the update, from the values before the step (a buffer filled lazily, as Nash-MTL's, has none)
    before = {k: initial[k] if initial[k].shape == v.shape else torch.zeros_like(v) for k, v in after.items()}
    scale = max(float((v - before[k]).abs().max()) for k, v in after.items())
    assert scale > 0, "nothing trained"
    for key, value in after.items():
        torch.testing.assert_close(
            first["state"][key] - before[key], value - before[key], rtol=1e-4, atol=1e-6 * scale, msg=key
        )
