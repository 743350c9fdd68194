"""Two CPU processes (gloo): for every class-incremental method of ``METHODS``, two optimizer steps under
Lightning's ``strategy="ddp"``, each rank training on its half (rows ``rank::2``) of fixed batches, leave
both ranks with the same parameters and buffers (MVP's ``prompt_counts`` included) as one process
training on the whole batches.

One spawn of two processes trains every method in turn (a spawned process spends most of its time
importing torch, timm and Lightning), each under its own ``Trainer(strategy="ddp")`` in the same process
group, and saves each rank's final state; the tests compare those states with single-process runs.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_mtl.continual import METHODS, StreamBatch
from tests.fixtures.ddp import rank_case, spawn_and_collect
from tests.fixtures.trainers import (
    one_thread,  # noqa: F401
    tiny_trainer,
)

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=5, num_heads=3, in_chans=3)
NUM_CLASSES = 6
NUM_SEEN = 5  # the last class stays masked
BATCH = 8  # rows of each global batch, 4 per rank
STEPS = 2
WORLD = 2
# plain SGD: the update is proportional to the gradient (Adam's first steps are about lr * sign(g) and
# would hide a wrongly reduced gradient)
LR = 0.5


def _module(name):
    torch.manual_seed(0)
    return METHODS[name](
        NUM_CLASSES,
        backbone="vit_tiny_patch16_224",
        vit_kwargs=TINY,
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
    )


def _batches():
    """``STEPS`` fixed global batches of ``BATCH`` rows: classes ``0 .. NUM_SEEN - 1``, new and replayed rows."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 3, 16, 16, generator=g)
        y = torch.randint(0, NUM_SEEN, (BATCH,), generator=g)
        is_new = torch.arange(BATCH) % 3 != 0
        out.append(StreamBatch(x, y, torch.full((BATCH,), NUM_SEEN), is_new))
    return out


class _FixedBatches(pl.LightningDataModule):
    """Serves the fixed batches; rank ``r`` of ``w`` gets rows ``r::w`` of each (a single process: all)."""

    def __init__(self):
        super().__init__()
        self.batches = _batches()

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        local = [StreamBatch(*(t[rank::world] for t in batch)) for batch in self.batches]
        return DataLoader(local, batch_size=None)


def _fit(module, **trainer_kwargs):
    trainer = tiny_trainer(
        max_steps=STEPS, limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, **trainer_kwargs
    )
    trainer.fit(module, datamodule=_FixedBatches())
    assert trainer.global_step == STEPS


def _worker(rank, folder, names):
    """One of the two processes: every method in turn under ``strategy="ddp"``, its final state saved."""
    for name in names:
        with rank_case(folder, name, rank):  # reported by that method's test (the methods after it do not run)
            module = _module(name)
            _fit(module, strategy="ddp", devices=WORLD)
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            torch.save(state, f"{folder}/{name}_rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_states(tmp_path_factory):
    """``name -> [state of rank 0, state of rank 1]`` after the DDP steps, or the error text of a rank."""
    folder = tmp_path_factory.mktemp("continual_ddp")
    names = sorted(METHODS)
    return spawn_and_collect(_worker, (str(folder), names), folder, names, world=WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_ddp_steps_equal_single_process_steps_on_the_concatenated_batch(ddp_states, name):
    states = ddp_states[name]
    if isinstance(states, str):
        pytest.fail(f"{name} failed under DDP:\n{states}")
    start = _module(name)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    _fit(start)
    single = start.state_dict()
    assert states[0].keys() == states[1].keys() == single.keys()
    # both ranks hold exactly the same parameters and buffers
    for key in single:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between the ranks"
    # ... and those of one process on the 8-row batches: the updates agree to float32 rounding (about
    # 1e-7 here; a loss term reduced per rank instead of over the global batch moves them by > 1e-5)
    assert any(not torch.equal(v, initial[k]) for k, v in single.items()), "nothing trained"
    for key, value in single.items():
        if value.is_floating_point():
            ddp_update, single_update = states[0][key] - initial[key], value - initial[key]
            torch.testing.assert_close(
                ddp_update, single_update, rtol=1e-3, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}"
            )
        else:
            assert torch.equal(states[0][key], value), f"{key}: {states[0][key].tolist()} != {value.tolist()}"
    if name == "mvp":
        # the counts of both ranks' selections: all 2 x 8 rows
        assert int(states[0]["prompt_counts"].sum()) == STEPS * BATCH


def test_synced_contrastive_loss_of_two_halves_is_the_loss_of_the_whole_batch():
    """The reduction MVP hands to :func:`contrastive_prompt_loss` under DDP, simulated in one process:
    each half's loss with the other half's sums added is the loss of the concatenated batch, value and
    gradient (the average of the halves' gradients, as DDP takes it); without the sync it is not."""
    from lightning_mtl.continual.mvp import contrastive_prompt_loss

    g = torch.Generator().manual_seed(0)
    query, keys = torch.randn(8, 5, generator=g), torch.randn(4, 5, generator=g)
    indices, counts = torch.tensor([0, 1, 1, 3, 0, 2, 2, 2]), torch.tensor([2, 0, 5, 1])
    keys.requires_grad_(True)
    whole = contrastive_prompt_loss(query, keys, indices, counts)
    (expected,) = torch.autograd.grad(whole, keys)
    halves = [slice(0, None, 2), slice(1, None, 2)]

    def local_sums(rows):  # the [3] vector the loss hands to sync, recovered through a recording sync
        seen = []
        contrastive_prompt_loss(query[rows], keys, indices[rows], counts, sync=lambda v: seen.append(v) or v)
        return seen[0].detach()

    losses, grads = [], []
    for rank, rows in enumerate(halves):
        other = local_sums(halves[1 - rank])
        loss = contrastive_prompt_loss(query[rows], keys, indices[rows], counts, sync=lambda v, other=other: v + other)
        # the backward of the differentiable sum adds every rank's gradient of the (identical) global loss
        grads.append(WORLD * torch.autograd.grad(loss, keys)[0])
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], whole.detach())
    torch.testing.assert_close(losses[1], whole.detach())
    torch.testing.assert_close((grads[0] + grads[1]) / WORLD, expected)
    # a sync that sums nothing is the plain batch mean; the unsynced halves are not the whole batch's loss
    torch.testing.assert_close(contrastive_prompt_loss(query, keys, indices, counts, sync=lambda v: v), whole)
    plain = [contrastive_prompt_loss(query[rows], keys, indices[rows], counts) for rows in halves]
    assert not torch.allclose((plain[0] + plain[1]) / 2, whole, rtol=1e-3)
