"""The LoFiT recipes of configs/finetuning run through the real command line, stage 1 feeding stage 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mtl.cli import main
from lightning_mtl.finetuning import LoFiTIntervention

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetuning"
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.mark.slow
def test_localize_then_tune_then_dpo_through_the_cli():
    # the conftest runs every test in its own folder: runs/ is written there
    cli = main(["fit", "--config", str(CONFIGS / "lofit_localize.yaml"), *FAST])
    assert cli.trainer.global_step == 2
    heads = LoFiTIntervention.read("runs/finetuning/lofit_heads.pt")["heads"].tolist()
    assert heads == [list(h) for h in cli.model.top_heads()] and len(heads) == 2

    cli = main(["fit", "--config", str(CONFIGS / "lofit_tune.yaml"), *FAST])
    assert cli.model.intervention.selected_heads() == sorted(map(tuple, heads))
    saved = LoFiTIntervention.read("runs/finetuning/lofit_intervention.pt")
    assert torch.count_nonzero(saved["offset"]) == 2 * 8 and torch.count_nonzero(saved["scale"]) == 0

    cli = main(
        ["fit", "--config", str(CONFIGS / "lofit_tune.yaml"), "--config", str(CONFIGS / "lofit_dpo.yaml"), *FAST]
    )
    assert cli.model.loss_name == "dpo" and cli.trainer.global_step == 2
    assert "val/reward_accuracy" in cli.trainer.callback_metrics
