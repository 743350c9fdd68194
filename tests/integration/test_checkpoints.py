"""A checkpoint written by a CLI run rebuilds its model alone: ``ModuleClass.load_from_checkpoint(path)``,
with no config and no objects passed, for every module family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten

from lightning_mtl.cli import main
from tests.config_matrix import compose_family, configs

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TINY_VIT = ["--model.init_args.backbone=vit_tiny_patch16_224", "--trainer.precision=32-true", "--trainer.accelerator=cpu",
            "--model.init_args.vit_kwargs={img_size: 16, patch_size: 4, depth: 2}"]  # fmt: skip
RECIPES = {
    "quickstart": configs("quickstart.yaml"),  # multi-task: encoder and tasks injected
    "mixup/digits+mixup": compose_family("mixup", "digits", "mixup"),
    "mixup/adautomix_digits": configs("mixup/adautomix_digits.yaml"),
    "ssl/digits+barlow_twins": compose_family("ssl", "digits", "barlow_twins"),
    "ssl/digits+mixed_barlow_twins": compose_family("ssl", "digits", "mixed_barlow_twins"),
    "continual/digits+l2p": [*compose_family("continual", "digits", "l2p"), *TINY_VIT],
    "continual/digits+er": [*compose_family("continual", "digits", "er"), *TINY_VIT],
}


def _inputs(batch):
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return first[0] if isinstance(first, (tuple, list)) else first  # the first view of a two-view batch


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_checkpoint_alone_rebuilds_the_model(recipe, tmp_path):
    cli = main(["fit", *RECIPES[recipe], *FAST])
    path = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(path)
    loaded = type(cli.model).load_from_checkpoint(path, map_location="cpu")
    inputs = _inputs(next(iter(cli.datamodule.train_dataloader())))[:4]
    model = cli.model.cpu().eval()
    loaded.eval()
    with torch.no_grad():
        expected, _ = tree_flatten(model(inputs))
        got, _ = tree_flatten(loaded(inputs))
    assert expected and len(got) == len(expected)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_test_subcommand_needs_only_the_checkpoint(tmp_path):
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST])
    path = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(path)
    tested = main(["test", "--ckpt_path", str(path), "--trainer.limit_test_batches=1", *FAST[1:]])
    assert type(tested.model).__name__ == "MultiTaskModule" and type(tested.datamodule).__name__ == "MultiDigits"
    assert "test/mean/acc" in tested.trainer.callback_metrics
