"""Two CPU processes (gloo, ddp_spawn): a prompt-tuning step under DDP equals the single-process step on the
concatenated batch, and every rank chooses the thresholds of the whole validation set."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl.finetuning import MultiLabelText, PromptTunedClassifier
from tests.finetuning._multilabel import BERT, write_splits
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer

KEYS = ("prompt", "head.weight", "head.bias", "thresholds")


class _Record(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {key: pl_module.state_dict()[key].detach().clone() for key in KEYS}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def _run(tmp_path, files, **trainer_kwargs):
    # no shuffling: the two ranks take texts 0, 2, 4, 6 and 1, 3, 5, 7 of the 8 the single process takes
    data = MultiLabelText(**files, batch_size=8 // trainer_kwargs.get("devices", 1), shuffle=False)
    torch.manual_seed(0)
    module = PromptTunedClassifier(num_labels=3, config=BERT, prompt_length=4, lr=1e3, head_lr=1.0,
                                   lr_decay=None, optimizer=functools.partial(torch.optim.SGD, lr=1.0))  # fmt: skip
    trainer = tiny_trainer(max_epochs=1, num_sanity_val_steps=0, callbacks=[_Record(tmp_path)], **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return torch.load(tmp_path / "rank0.pt")


@pytest.mark.slow
def test_a_ddp_step_equals_the_single_process_step_and_thresholds_come_from_every_rank(tmp_path):
    files = write_splits(tmp_path, train=8, val=16, test=4)  # one training batch: one step, then validation
    single = _run(tmp_path, files)
    _run(tmp_path, files, strategy=SpawnDDP(), devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in KEYS:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"the ranks hold different {key}"
    torch.manual_seed(0)
    start = PromptTunedClassifier(num_labels=3, config=BERT, prompt_length=4)
    # the step moved something (the frozen random encoder passes the prompt small gradients: hence lr 1e3)
    assert not torch.allclose(single["prompt"], start.prompt, atol=1e-3)
    assert not torch.allclose(single["head.weight"], start.head.weight, atol=1e-3)
    # the same sums in another order (and other padding widths): float32 rounding only
    for key in KEYS:
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(single["thresholds"], torch.full((3,), 0.5))  # chosen on the validation texts
