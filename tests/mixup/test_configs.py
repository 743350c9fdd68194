"""Every CIFAR-100 mixup recipe through the real CLI on a CIFAR-100 fixture in the on-disk format: the data file
with each mixing method, and the generator models' recipes (the embedded-digits recipes run in
tests/integration/test_cli.py)."""

from __future__ import annotations

import pytest

from lightning_mtl.cli import main
from tests.config_matrix import MIXUP_METHODS, compose_family, configs
from tests.fixtures.cifar import write_cifar

RECIPES = {**{name: compose_family("mixup", "cifar100", name) for name in MIXUP_METHODS},
           **{name: configs(f"mixup/{name}_cifar100.yaml") for name in ("automix", "adautomix")}}  # fmt: skip


def test_the_four_published_methods_have_a_cifar100_recipe():
    assert sorted(RECIPES) == ["adautomix", "automix", "cutmix", "mixup"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cifar100_recipe_runs_through_the_cli(tmp_path, name):
    write_cifar(tmp_path, num_classes=100)
    args = ["fit", *RECIPES[name], f"--data.init_args.root={tmp_path}", "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0", "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
            "--model.init_args.encoder.init_args.width=8"]  # fmt: skip
    if "automix" in name:  # a narrower network (for speed) has a narrower stage-3 map
        args.append("--model.init_args.feature_channels=32")
    cli = main(args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert "val/mean/acc" in cli.trainer.callback_metrics
