"""Two CPU processes (gloo, ddp_spawn): a LEVI step under DDP, its feature cache on, equals the single-process
step on the concatenated batch, and the ranks stay identical."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.finetuning import LEVI, LEVIFeatureCache
from tests.fixtures.ddp import SpawnDDP
from tests.fixtures.trainers import tiny_trainer


class _Record(pl.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def _module() -> LEVI:
    torch.manual_seed(0)
    backbone = DigitsCNN(channels=(4, 8), out_features=16)
    return LEVI(10, backbone=backbone, layers=["features.5", "project"], input_shape=[1, 8, 8], small_width=4,
                adapter_hidden=8, optimizer=functools.partial(torch.optim.SGD, lr=0.5))  # fmt: skip


def _loader(batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    )
    # no shuffling: the ranks take samples 0, 2, 4, ... and 1, 3, 5, ... of the 16 the single process takes
    return DataLoader(data, batch_size=batch_size, shuffle=False)


@pytest.mark.slow
def test_a_ddp_step_equals_the_single_process_step_on_the_concatenated_batch(tmp_path):
    single = _module()
    tiny_trainer(max_steps=1, callbacks=[LEVIFeatureCache()]).fit(single, train_dataloaders=_loader(16))
    tiny_trainer(max_steps=1, strategy=SpawnDDP(), devices=2, callbacks=[LEVIFeatureCache(), _Record(tmp_path)]).fit(
        _module(), train_dataloaders=_loader(8)
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    start = _module().state_dict()
    assert not torch.allclose(single.state_dict()["adapter.0.weight"], start["adapter.0.weight"])
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"the ranks differ in {name}"
        # the same sums in another order: float32 rounding only
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6)
        if name.startswith("backbone."):
            assert torch.equal(ranks[0][name], start[name]), f"the frozen {name} changed under DDP"
