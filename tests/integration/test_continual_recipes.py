"""The continual-learning recipes (configs/continual/data/<data set>.yaml with each configs/continual/methods/
file) through the real CLI: the embedded digits runs end to end, every Si-Blurry combination builds with the
published protocol, and one runs on a fixture in the data set's own format."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lightning_mtl.callbacks.anytime import AnytimeEvaluation
from lightning_mtl.cli import MultiTaskCLI, main
from lightning_mtl.continual import METHODS, SiBlurryStream, VirtualOutlierRegularization
from tests.config_matrix import CONTINUAL_DATA, CONTINUAL_METHODS, compose_family
from tests.fixtures.cifar import write_cifar
from tests.fixtures.trainers import one_thread  # noqa: F401

DATASETS = {"cifar100": "CIFAR100", "tiny_imagenet": "TinyImageNet", "imagenet_r": "ImageNetR"}
TINY_VIT = "{img_size: 16, patch_size: 4, depth: 5}"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _tiny_overrides(tmp_path: Path) -> list[str]:
    return [
        "--model.init_args.backbone=vit_tiny_patch16_224",
        f"--model.init_args.vit_kwargs={TINY_VIT}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]


def test_every_method_has_a_method_file_and_every_data_set_a_data_file():
    assert CONTINUAL_METHODS == sorted(METHODS)
    assert CONTINUAL_DATA == sorted([*DATASETS, "digits"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_digits_recipe_runs_and_reports_the_continual_metrics(method, tmp_path):
    # a shortened stream (10 tasks, 30 steps) so that a task ends and several evaluations run
    cli = main([
        "fit", *compose_family("continual", "digits", method), *_tiny_overrides(tmp_path),
        "--data.init_args.num_tasks=10", "--trainer.max_steps=30",
    ])  # fmt: skip
    assert type(cli.model) is METHODS[method]
    anytime = next(c for c in cli.trainer.callbacks if isinstance(c, AnytimeEvaluation))
    assert len(anytime.evaluations) >= 2 and anytime.class_accuracies
    for key in ("continual/A_auc", "continual/A_last"):
        value = float(cli.trainer.callback_metrics[key])
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    if method == "ovor":
        vor = next(c for c in cli.trainer.callbacks if isinstance(c, VirtualOutlierRegularization))
        assert 0 in vor.done_tasks  # the head phase ran at the first task end


def test_offline_class_incremental_from_the_same_recipe(tmp_path):
    # task after task, 2 epochs each, disjoint classes, equal tasks (i-Blurry boundaries): the schedule visits each task's samples twice and
    # the evaluations at the task ends see the classes of the finished tasks only
    cli = main([
        "fit", *compose_family("continual", "digits", "dualprompt"), *_tiny_overrides(tmp_path),
        "--data.init_args.online=false", "--data.init_args.epochs_per_task=2", "--data.init_args.num_tasks=10",
        "--data.init_args.disjoint_class_ratio=1.0", "--data.init_args.blurry_sample_ratio=0.0",
        "--data.init_args.stochastic=false",
        "--trainer.max_steps=40",
    ])  # fmt: skip
    stream = cli.datamodule
    first_task = [s for s in stream.schedule if s.task == 0]
    assert sum(s.last_rep for s in first_task) == len(first_task) // 2  # the second epoch is the last
    assert first_task[-1].task_end and first_task[-1].num_seen == 1  # one disjoint class per task
    anytime = next(c for c in cli.trainer.callbacks if isinstance(c, AnytimeEvaluation))
    task_ends = [e for e in anytime.evaluations if e["task_end"]]
    assert task_ends and [e["num_seen"] for e in task_ends] == list(range(1, len(task_ends) + 1))


RECIPES = [(data, method) for data in sorted(DATASETS) for method in CONTINUAL_METHODS]


@pytest.mark.parametrize("data, method", RECIPES, ids=[f"{d}/{m}" for d, m in RECIPES])
def test_si_blurry_recipe_builds_with_the_published_protocol(data, method, tmp_path):
    cli = MultiTaskCLI(args=[*compose_family("continual", data, method), *_tiny_overrides(tmp_path)], run=False)
    assert type(cli.model) is METHODS[method]
    stream = cli.datamodule
    assert isinstance(stream, SiBlurryStream) and type(stream.source).__name__ == DATASETS[data]
    assert (stream.num_tasks, stream.disjoint_class_ratio, stream.blurry_sample_ratio) == (5, 0.5, 0.1)
    assert (stream.online, stream.online_iter, stream.batch_size, stream.seed) == (True, 3.0, 32, 1)
    assert stream.memory_size == (500 if method == "er" else 0)
    assert cli.model.num_classes == {"cifar100": 100}.get(data, 200)
    callbacks = {type(c) for c in cli.trainer.callbacks}
    assert AnytimeEvaluation in callbacks
    assert (VirtualOutlierRegularization in callbacks) == (method == "ovor")
    anytime = next(c for c in cli.trainer.callbacks if isinstance(c, AnytimeEvaluation))
    assert anytime.eval_period == 1000


def test_cifar100_recipe_runs_on_a_fixture_in_the_cifar_format(tmp_path):
    # the pickled CIFAR-100 layout with random labels; a seed whose test labels all occur in training
    for seed in range(50):
        root = tmp_path / f"data{seed}"
        written = write_cifar(root, num_classes=100, per_file=40, test=6, seed=seed)
        if {y for _, y in written["test"]} <= {y for _, y in written["train"]}:
            break
    cli = main([
        "fit", *compose_family("continual", "cifar100", "mvp"), *_tiny_overrides(tmp_path),
        f"--data.init_args.source.init_args.root={root}",
        "--data.init_args.source.init_args.train_transform.init_args.image_size=16",
        "--data.init_args.source.init_args.eval_transform.init_args.image_size=16",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=8", "--trainer.max_steps=12",
    ])  # fmt: skip
    assert cli.trainer.global_step == 12
    stream = cli.datamodule
    seen = np.unique([stream.class_order[k] for k in range(stream.schedule[11].num_seen)])
    assert len(seen) == stream.schedule[11].num_seen  # exposure order maps back to distinct CIFAR classes
