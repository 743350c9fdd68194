"""The controllable recipes through the real command line, and the evaluation callback's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_mtl.cli import main
from lightning_mtl.controllable import (
    ControllabilityEvaluation,
    SlimmableDeepLabHead,
    SlimmableResNet18,
    SlimmableResNetDilated,
)
from tests.controllable.test_search import _module
from tests.fixtures.cifar import write_cifar
from tests.fixtures.dense import write_cityscapes, write_nyuv2
from tests.fixtures.trainers import one_thread, tiny_multidigits, tiny_trainer  # noqa: F401  # one_thread: autouse

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "controllable"
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_train=64", "--data.init_args.num_val=32", "--data.init_args.num_test=32"]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_every_controllable_recipe_runs_through_the_cli(method):
    args = ["--config", str(CONFIGS / "data/multidigits.yaml"), "--config", str(CONFIGS / f"methods/{method}.yaml")]
    cli = main(["fit", *args, *FAST])
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    assert cli.model.kd_weight == (0.0 if method == "no_kd" else 1.0)


def test_evaluation_callback_writes_the_table_and_the_picture(tmp_path):
    callback = ControllabilityEvaluation(
        preferences=[[0.8, 0.2], [0.2, 0.8]], budgets=[0.5, 1.0], dirpath=str(tmp_path)
    )
    trainer = tiny_trainer(max_steps=1, limit_val_batches=1, callbacks=[callback])
    trainer.fit(_module(), datamodule=tiny_multidigits(num_val=32))
    table = json.loads((tmp_path / "controllability.json").read_text())
    assert len(table["rows"]) == 4 and set(table["controllability"]) == {"0.5", "1.0"}
    assert callback.results is not None and callback.results["mean_controllability"] == table["mean_controllability"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "controllability.png").read_bytes()[:4] == b"\x89PNG"


_REAL = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.accelerator=cpu", "--test_after_fit=false", "--data.init_args.batch_size=2",
         "--data.init_args.num_workers=0"]  # fmt: skip


@pytest.mark.parametrize("data, tasks", [("nyuv2", ("segmentation", "depth", "normal")),
                                         ("cityscapes", ("segmentation", "depth"))])  # fmt: skip
def test_dense_controllable_recipes_run_through_the_cli_on_the_on_disk_layout(data, tasks, tmp_path):
    (write_nyuv2 if data == "nyuv2" else write_cityscapes)(tmp_path / data, n_train=2, n_val=2, size=(32, 32))
    # only the sizes shrink: ResNet-18 (512 features) and heads of 8 channels, so a CPU runs it in seconds
    shrink = ["--model.init_args.encoder.init_args.model_name=resnet18"]
    for task in tasks:
        shrink += [f"--model.init_args.tasks.{task}.init_args.head.init_args.in_channels=512",
                   f"--model.init_args.tasks.{task}.init_args.head.init_args.width=8"]  # fmt: skip
    args = ["--config", str(CONFIGS / f"data/{data}.yaml"), "--config", str(CONFIGS / "methods/cikd.yaml")]
    root = [f"--data.init_args.root={tmp_path / data}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = main(["fit", *args, *_REAL, *root, *shrink])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    model = cli.model
    assert isinstance(model.encoder, SlimmableResNetDilated) and tuple(model.task_names) == tasks
    assert all(isinstance(model.heads[t], SlimmableDeepLabHead) for t in tasks)
    # the sandwich rule ran: the widest, the narrowest and two random configurations
    configs = model.last_configurations
    assert len(configs) == 4 and set(configs[0].values()) == {1.0} and set(configs[1].values()) == {0.25}
    assert all(f"val/{t}/loss" in cli.trainer.callback_metrics for t in tasks)


def test_cifar_recipe_trains_the_slimmable_resnet18_through_the_cli(tmp_path):
    write_cifar(tmp_path, per_file=4, test=4)
    args = ["--config", str(CONFIGS / "data/cifar10.yaml"), "--config", str(CONFIGS / "methods/cikd.yaml")]
    shrink = ["--model.init_args.encoder.init_args.width=8", "--model.init_args.decoder_hidden=16",
              "--data.init_args.val_size=4"]  # fmt: skip
    root = [f"--data.init_args.root={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = main(["fit", *args, *_REAL, *root, *shrink])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert isinstance(cli.model.encoder, SlimmableResNet18) and tuple(cli.model.task_names) == ("label",)
    assert len(cli.model.last_configurations) == 4
    assert "val/label/acc" in cli.trainer.callback_metrics
