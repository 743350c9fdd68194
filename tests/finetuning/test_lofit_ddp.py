"""Two CPU processes (gloo, ddp_spawn): a LoFiT step under DDP equals the single-process step on the
concatenated batch, and the ranks stay identical."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl.finetuning import LoFiT, PreferencePairs
from tests.finetuning._models import GPT2, VOCAB
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer


class _Record(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.trained.detach().clone(), self.folder / f"rank{trainer.global_rank}.pt")


def _run(tmp_path, stage, loss, **trainer_kwargs):
    # no shuffling: the two ranks take samples 0, 2, 4, ... and 1, 3, 5, ... of the 16 the single process takes
    data = PreferencePairs(num_train=16, num_val=8, vocab_size=VOCAB, prompt_length=6, answer_length=3,
                           batch_size=16 // trainer_kwargs.get("devices", 1), shuffle=False)  # fmt: skip
    torch.manual_seed(0)
    module = LoFiT(config=GPT2, stage=stage, loss=loss, heads=[[1, 2], [0, 3]], l1_lambda=1e-2,
                   optimizer=functools.partial(torch.optim.SGD, lr=0.5))  # fmt: skip
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[_Record(tmp_path)], **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return module


@pytest.mark.slow
def test_a_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path):
    """DPO (its reference pass included) with the L1 term, on the selected heads; one spawn (a spawn costs
    about a minute on a loaded machine): SFT's token mean differs from DPO's pair mean only in the loss."""
    stage, loss = "tune", "dpo"
    single = _run(tmp_path, stage, loss).trained.detach().clone()
    _run(tmp_path, stage, loss, strategy=SpawnDDP(), devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1]), "the ranks hold different interventions"
    torch.manual_seed(0)
    start = LoFiT(config=GPT2, stage=stage, heads=[[1, 2], [0, 3]]).trained.detach()
    assert not torch.allclose(single, start, atol=1e-4)  # the step moved something
    # the same sums in another order: float32 rounding only
    torch.testing.assert_close(ranks[0], single, rtol=1e-5, atol=1e-6)
