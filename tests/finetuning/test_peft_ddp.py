"""Two CPU processes (gloo, ddp_spawn): a PEFTClassifier step with EDA copies and CE + SupCon (gathered across
ranks) equals the single-process step on the concatenated batch, and the ranks stay identical."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from lightning_mtl.finetuning import EDA, FewShotText, PEFTClassifier
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer

# no dropout: a rank's masks could not equal those of the single process's bigger batch
BERT = dict(model_type="bert", vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)  # fmt: skip


class _Record(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in pl_module.saved_keys}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def _run(tmp_path, **trainer_kwargs):
    # no shuffling: the ranks take sentences 0, 2, 4, ... and 1, 3, 5, ... of the 16 the single process takes
    devices = trainer_kwargs.get("devices", 1)
    data = FewShotText(per_class=4, val_per_class=2, test_per_class=2, max_length=24, batch_size=16 // devices,
                       shuffle=False, augment=EDA(alpha=0.2, seed=1), num_views=1)  # fmt: skip
    module = PEFTClassifier(num_classes=4, adapter="lora", adapter_kwargs={"r": 4, "lora_dropout": 0.0}, config=BERT,
                            supcon_weight=0.5, optimizer=functools.partial(torch.optim.SGD, lr=0.5))  # fmt: skip
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, callbacks=[_Record(tmp_path)], **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return module


@pytest.mark.slow
def test_a_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path):
    single = _run(tmp_path)
    single_state = {k: v.detach().clone() for k, v in single.state_dict().items() if k in single.saved_keys}
    _run(tmp_path, strategy=SpawnDDP(), devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    start = PEFTClassifier(num_classes=4, adapter="lora", adapter_kwargs={"r": 4}, config=BERT).state_dict()
    for key, value in single_state.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"the ranks hold different {key}"
        # the same sums in another order: float32 rounding only
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(single_state["head.weight"], start["head.weight"])
    moved = [k for k in single_state if "lora_B" in k and not torch.equal(single_state[k], start[k])]
    assert moved, "the step moved no adapter weight"
