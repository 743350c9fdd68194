"""A run resumed from a mid-training checkpoint ends with the same weights as an uninterrupted run,
and a crash while saving never replaces a good checkpoint by a broken one."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mtl.callbacks import BestMetricsSummary
from tests.fixtures.trainers import tiny_module, tiny_multidigits, tiny_trainer


def _fit(tmp_path, max_epochs, ckpt_path=None, seed=0, aggregator="ls"):
    pl.seed_everything(seed)
    module = tiny_module(
        aggregator=aggregator,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    )
    best = BestMetricsSummary()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer = tiny_trainer(max_epochs=max_epochs, deterministic=True, enable_checkpointing=True,
                           callbacks=[checkpoint, best])  # fmt: skip
    trainer.fit(module, datamodule=tiny_multidigits(), ckpt_path=ckpt_path)
    return module, best, trainer


@pytest.mark.parametrize("aggregator", ["ls", "dwa", "famo", "rlw", "gradvac", "nashmtl"])
def test_resume_matches_uninterrupted_run(tmp_path, aggregator):
    """Stateful methods (DWA's epoch means, FAMO's logits and Adam moments, RLW's and GradVac's
    random streams and EMAs, Nash-MTL's warm start) resume exactly too."""
    full, full_best, _ = _fit(tmp_path / "full", max_epochs=4, aggregator=aggregator)
    _fit(tmp_path / "part", max_epochs=2, aggregator=aggregator)
    resumed, resumed_best, trainer = _fit(tmp_path / "resumed", max_epochs=4, ckpt_path=tmp_path / "part/epoch=1.ckpt",
                                          seed=123, aggregator=aggregator)  # fmt: skip
    assert trainer.current_epoch == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b  # extra state: seeds, counters
        assert same, f"{name} differs after resume"
    assert resumed_best.best == full_best.best


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    module = tiny_module()
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_multidigits())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)  # some bytes are written, then the process "dies"
        raise KeyboardInterrupt("simulated crash during checkpointing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert "state_dict" in torch.load(path, weights_only=False)
