"""The LEVI recipes of configs/finetuning (LEVI, linear probe, full fine-tuning) run through the real command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_mtl.architectures import DigitsCNN
from lightning_mtl.cli import main
from lightning_mtl.finetuning import LEVIFeatureCache

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetuning"
FAST = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.mark.slow
def test_levi_and_its_baselines_through_the_cli():
    # the conftest runs every test in its own folder: the backbone file the recipe reads is written there
    torch.manual_seed(0)
    weights = DigitsCNN(channels=(32, 64), out_features=128).state_dict()
    Path("runs/finetuning").mkdir(parents=True)
    torch.save(weights, "runs/finetuning/digits_cnn_rot90.pt")

    cli = main(["fit", "--config", str(CONFIGS / "levi.yaml"), *FAST])
    assert cli.trainer.global_step == 4 and "val/accuracy" in cli.trainer.callback_metrics
    assert torch.equal(cli.model.backbone.state_dict()["project.1.weight"], weights["project.1.weight"])
    cache = next(c for c in cli.trainer.callbacks if isinstance(c, LEVIFeatureCache))
    assert cache.store.hits > 0

    cli = main(
        ["fit", "--config", str(CONFIGS / "levi.yaml"), "--config", str(CONFIGS / "levi_linear_probe.yaml"), *FAST]
    )
    assert cli.model.small_model is None and cli.model.view_dims == [128]

    cli = main(
        ["fit", "--config", str(CONFIGS / "levi.yaml"), "--config", str(CONFIGS / "levi_full_finetune.yaml"), *FAST]
    )
    assert not cli.model.freeze_backbone
    assert not any(isinstance(c, LEVIFeatureCache) for c in cli.trainer.callbacks)
    assert not torch.equal(cli.model.backbone.state_dict()["project.1.weight"], weights["project.1.weight"])
