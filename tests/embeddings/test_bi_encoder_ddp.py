"""Two CPU processes (gloo, ddp_spawn): the BiEncoder gathers every rank's embeddings with gradients, so the
DDP loss and gradients equal the single-process ones on the concatenated batch (in-batch negatives from both
ranks, hard negatives and expert routing included)."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_mtl.embeddings import BiEncoder
from tests.embeddings._models import tiny_config
from tests.embeddings._pairs import TokenPairs
from tests.fixtures.trainers import tiny_trainer

pytest.importorskip("transformers")


class _Record(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.save({"batch": batch, "loss": outputs["loss"].detach()}, self.folder / f"batch{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # after backward: DDP has averaged the gradients over the ranks
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save(grads, self.folder / f"grads{trainer.global_rank}.pt")


def _cat(batches):
    if isinstance(batches[0], dict):
        return {key: _cat([b[key] for b in batches]) for key in batches[0]}
    return torch.cat(batches)


@pytest.mark.slow
def test_ddp_loss_and_gradients_equal_single_process_on_the_concatenated_batch(tmp_path):
    torch.manual_seed(0)
    module = BiEncoder(config=tiny_config("bert"), num_experts=3, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    start = copy.deepcopy(module)
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True)
    trainer = tiny_trainer(strategy=strategy, devices=2, max_epochs=1, limit_train_batches=1,
                           limit_val_batches=0, callbacks=[_Record(tmp_path)])  # fmt: skip
    trainer.fit(module, DataLoader(TokenPairs(n=16, k=1), batch_size=4))
    records = [torch.load(tmp_path / f"batch{r}.pt") for r in (0, 1)]
    grads = [torch.load(tmp_path / f"grads{r}.pt") for r in (0, 1)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert not torch.equal(records[0]["batch"]["domain"], records[1]["batch"]["domain"]) or not torch.equal(
        records[0]["batch"]["anchor"]["input_ids"], records[1]["batch"]["anchor"]["input_ids"]
    ), "both ranks saw the same samples"

    joined = _cat([r["batch"] for r in records])
    loss = start.batch_loss(joined)
    for record in records:  # each rank computed the loss of the whole (gathered) batch
        torch.testing.assert_close(record["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, p in start.named_parameters():
        if p.grad is None:  # an expert no sample of either rank used
            assert name not in grads[0] or not grads[0][name].any(), name
            continue
        torch.testing.assert_close(grads[0][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

    # the gradient of the per-rank loss (no gather) differs: the equality above is no coincidence
    local = copy.deepcopy(start)
    local.zero_grad()
    sum(local.batch_loss(r["batch"]) for r in records).div(2).backward()
    weight = "encoder.model.embeddings.word_embeddings.weight"
    assert not torch.allclose(dict(local.named_parameters())[weight].grad, grads[0][weight], rtol=1e-3, atol=1e-5)


def test_experts_under_ddp_without_find_unused_parameters_are_refused_at_setup():
    module = BiEncoder(config=tiny_config("bert"), num_experts=2)
    module.trainer = tiny_trainer(strategy=DDPStrategy(), devices=1)
    with pytest.raises(ValueError, match="use strategy 'ddp_find_unused_parameters_true'"):
        module.setup("fit")
