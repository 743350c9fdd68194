"""Every CIFAR-100 mixup recipe through the real CLI on a CIFAR-100 fixture in the on-disk format (the
embedded-digits recipes run in tests/integration/test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.cli import main
from tests.fixtures.cifar import write_cifar

ROOT = Path(__file__).resolve().parents[2]
RECIPES = [ROOT / "configs" / "cifar100" / f"{name}.yaml" for name in ("mixup", "cutmix", "automix", "adautomix")]


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.stem)
def test_cifar100_recipe_runs_through_the_cli(tmp_path, config):
    write_cifar(tmp_path, num_classes=100)
    args = ["fit", "--config", str(config), f"--data.init_args.root={tmp_path}", "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0", "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
            "--model.init_args.encoder.init_args.width=8"]  # fmt: skip
    if "automix" in config.stem:  # a narrower network (for speed) has a narrower stage-3 map
        args.append("--model.init_args.feature_channels=32")
    cli = main(args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert "val/mean/acc" in cli.trainer.callback_metrics
