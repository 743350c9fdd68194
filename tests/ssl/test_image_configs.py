"""The CIFAR-10/100, STL-10 and Tiny-ImageNet (Mixed) Barlow Twins and linear-evaluation recipes through the CLI
(fast_dev_run) on tiny fixtures written in each data set's real layout: configs/ssl/data/<data set>.yaml with each
method of configs/ssl/methods/ and with configs/ssl/linear_eval/<data set>.yaml (the embedded digits run in
tests/integration/test_cli.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_mtl.architectures.resnet_cifar import ResNet18
from lightning_mtl.cli import main
from tests.config_matrix import SSL_DATA, SSL_METHODS, compose_family
from tests.fixtures.cifar import write_cifar
from tests.fixtures.stl10 import write_stl10
from tests.fixtures.tiny_imagenet import write_tiny_imagenet

WRITERS = {
    "cifar10": partial(write_cifar, num_classes=10, per_file=4, test=8),
    "cifar100": partial(write_cifar, num_classes=100, per_file=4, test=8),
    "stl10": partial(write_stl10, train=20, test=8, unlabeled=8),
    "tiny_imagenet": partial(write_tiny_imagenet, val_classes=8),
}
RECIPES = [(name, recipe) for name in WRITERS for recipe in [*SSL_METHODS, "linear_eval"]]
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4",
        "--data.init_args.val_size=4"]  # fmt: skip


def test_every_ssl_data_set_has_both_methods_and_a_linear_evaluation():
    assert sorted(SSL_DATA) == sorted([*WRITERS, "digits"]) and SSL_METHODS == ["barlow_twins", "mixed_barlow_twins"]


@pytest.mark.parametrize("name, recipe", RECIPES, ids=[f"{n}/{r}" for n, r in RECIPES])
def test_recipe_runs_through_the_cli_on_a_fixture(tmp_path, name, recipe):
    data = tmp_path / "data"
    WRITERS[name](data)
    args = ["fit", *compose_family("ssl", name, recipe), f"--data.init_args.root={data}", *FAST]
    if recipe == "linear_eval":
        # a self-supervised checkpoint's layout: the backbone's weights under "backbone."
        torch.manual_seed(0)
        state = {f"backbone.{k}": v for k, v in ResNet18().state_dict().items()}
        torch.save({"state_dict": state}, tmp_path / "ssl.ckpt")
        args.append(f"--model.init_args.checkpoint_path={tmp_path / 'ssl.ckpt'}")
    cli = main(args)
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    if recipe == "linear_eval":
        assert torch.equal(cli.model.backbone.conv1.weight, state["backbone.conv1.weight"])
    else:
        assert cli.model.lambda_bt == (1 / 1024 if name == "tiny_imagenet" else 1 / 128)
        if recipe == "mixed_barlow_twins":
            assert cli.model.lambda_reg == (2.0 if name == "stl10" else 4.0)
