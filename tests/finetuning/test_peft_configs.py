"""The PEFT recipes of configs/finetuning/peft run through the real command line, fragments composed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.cli import main
from lightning_mtl.finetuning import EDA

PEFT = Path(__file__).resolve().parents[2] / "configs" / "finetuning" / "peft"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fragments", [[], ["prefix", "augment", "supcon"], ["augment", "mixup"]])
def test_the_recipes_train_from_yaml(fragments):
    configs = [arg for name in ["lora", *fragments] for arg in ("--config", str(PEFT / f"{name}.yaml"))]
    cli = main(["fit", *configs, *FAST])
    assert cli.trainer.global_step == 2 and "val/accuracy" in cli.trainer.callback_metrics
    model, data = cli.model, cli.datamodule
    assert model.hparams.adapter == ("prefix" if "prefix" in fragments else "lora")
    assert model.supcon_weight == (0.5 if "supcon" in fragments else 0.0)
    assert (model.mixup is not None) == ("mixup" in fragments)
    assert isinstance(data.augment, EDA) == ("augment" in fragments) and data.num_views == int("augment" in fragments)
    assert "return" in (data.augment.synonyms if data.augment else {"return": 0})
