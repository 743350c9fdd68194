"""Two CPU processes (gloo, spawned by Lightning): the DDP gradients of Barlow Twins and Mixed Barlow Twins equal the
single-process gradients on the concatenated batch (the cross-correlation and the standardization
statistics are reduced with a differentiable all-reduce)."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_mtl.ssl import BarlowTwins, MixedBarlowTwins
from lightning_mtl.ssl.losses import barlow_twins_loss, mixed_barlow_twins_loss
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer


class _MLP(nn.Module):
    """No BatchNorm: BatchNorm would normalize per rank (SyncBatchNorm needs a GPU)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
        self.out_features = 6

    def forward(self, x):
        return self.net(x)


class _Views(Dataset):
    def __init__(self, n=32):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 12, generator=generator)
        self.a = self.x + 0.3 * torch.randn(n, 12, generator=generator)
        self.b = self.x + 0.3 * torch.randn(n, 12, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), i % 3


class _Data(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(_Views(), batch_size=8)


class _Record(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.save(batch, self.folder / f"batch{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # after backward: DDP has averaged the gradients over the ranks
        grads = [p.grad.detach().clone() for p in pl_module.parameters()]
        torch.save(grads, self.folder / f"grads{trainer.global_rank}.pt")


def _module(cls):
    torch.manual_seed(0)
    kwargs = dict(embedding_dim=5, projector_hidden=(), lambda_bt=0.2, warmup_epochs=0, cosine=False,
                  optimizer=functools.partial(torch.optim.SGD, lr=0.1))  # fmt: skip
    if cls is MixedBarlowTwins:
        kwargs.update(lambda_reg=3.0, seed=4)
    return cls(_MLP(), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [BarlowTwins, MixedBarlowTwins])
def test_ddp_gradients_equal_single_process_gradients_on_the_concatenated_batch(tmp_path, cls):
    module = _module(cls)
    start = copy.deepcopy(module)
    trainer = tiny_trainer(strategy=SpawnDDP(), devices=2, max_epochs=1, limit_train_batches=1,
                           limit_val_batches=0, callbacks=[_Record(tmp_path)])  # fmt: skip
    trainer.fit(module, datamodule=_Data())
    ddp_grads = [torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1)]
    for a, b in zip(*ddp_grads):
        assert torch.equal(a, b), "ranks hold different gradients"

    batches = [torch.load(tmp_path / f"batch{r}.pt") for r in (0, 1)]
    assert not torch.equal(batches[0][0][0], batches[1][0][0]), "both ranks saw the same samples"
    y_a = torch.cat([b[0][0] for b in batches])
    y_b = torch.cat([b[0][1] for b in batches])
    _, z_a = start.embed(y_a)
    _, z_b = start.embed(y_b)
    if cls is MixedBarlowTwins:
        # each rank permuted its own 8 samples: on the concatenated batch the permutation is block-diagonal
        draws = [start.draw_mix(8, 0, 0, rank) for rank in (0, 1)]
        alpha = draws[0][0]
        assert draws[1][0] == alpha
        perm = torch.cat([draws[0][1], draws[1][1] + 8])
        _, z_m = start.embed(alpha * y_a + (1 - alpha) * y_b[perm])
        loss = mixed_barlow_twins_loss(z_a, z_b, z_m, alpha, perm, 0.2, 3.0, sync=False).loss
    else:
        loss = barlow_twins_loss(z_a, z_b, 0.2, sync=False).loss
    single = torch.autograd.grad(loss, list(start.parameters()))
    for (name, _), g_ddp, g_single in zip(start.named_parameters(), ddp_grads[0], single):
        assert torch.allclose(g_ddp, g_single, atol=1e-5, rtol=1e-4), name  # bias: 0 up to rounding
    # and the update: SGD from the same start
    for (name, p_ddp), p_start, g in zip(module.named_parameters(), start.parameters(), single):
        assert torch.allclose(p_ddp, p_start - 0.1 * g, atol=1e-6), name


@pytest.mark.slow
def test_plain_all_reduce_would_give_wrong_gradients(tmp_path):
    """The trap METHODS.md names: the per-rank loss (no differentiable reduction) gives other gradients,
    so the equality above is not a coincidence of the set-up."""
    start = _module(BarlowTwins)
    data = _Views()
    y_a, y_b = data.a[:16], data.b[:16]
    full = barlow_twins_loss(start.embed(y_a)[1], start.embed(y_b)[1], 0.2, sync=False).loss
    g_full = torch.autograd.grad(full, list(start.parameters()))
    per_rank = [barlow_twins_loss(start.embed(y_a[s])[1], start.embed(y_b[s])[1], 0.2, sync=False).loss
                for s in (slice(0, 8), slice(8, 16))]  # fmt: skip
    g_avg = [sum(g) / 2 for g in zip(*(torch.autograd.grad(loss, list(start.parameters())) for loss in per_rank))]
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(g_full, g_avg))
