"""Controllability over dense tasks with mixed metric directions (NYUv2: mIoU higher is better, depth error and
normal angle lower is better): each task's metric counts in its own direction, read from its torchmetrics flag."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchmetrics import MeanMetric

from lightning_mtl import ClassificationTask
from lightning_mtl.cli import main
from lightning_mtl.controllable import (
    ControllableMultiTaskModule,
    SlimmableDeepLabHead,
    SlimmableResNetDilated,
    controllability,
    controllability_grid,
    evaluation,
    metric_choice,
)
from lightning_mtl.datamodules.nyuv2 import NYUv2
from lightning_mtl.multitask.dense import DepthTask, SegmentationTask, SurfaceNormalTask
from tests.fixtures.dense import write_nyuv2
from tests.fixtures.trainers import one_thread  # noqa: F401  # the autouse fixture

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "controllable"
NYU_METRICS = {"segmentation": "miou", "depth": "abs_err", "normal": "mean_angle"}
WIDTHS = (0.25, 0.5, 1.0)


def _dense_module() -> ControllableMultiTaskModule:
    torch.manual_seed(0)

    def head(channels: int) -> SlimmableDeepLabHead:
        return SlimmableDeepLabHead(512, channels, width=8, width_mults=WIDTHS)

    return ControllableMultiTaskModule(
        encoder=SlimmableResNetDilated("resnet18", width_mults=WIDTHS),
        tasks={"segmentation": SegmentationTask(13, head=head(13)), "depth": DepthTask(head=head(1)),
               "normal": SurfaceNormalTask(head=head(3))},
        decoder_widths=WIDTHS,
    )  # fmt: skip


def _nyuv2_batches(root: Path) -> list:
    write_nyuv2(root, n_train=2, n_val=2, size=(32, 32))
    data = NYUv2(root=str(root), batch_size=2, num_workers=0, augment=False)
    data.setup("fit")
    return list(data.val_dataloader())


def test_lower_is_better_metrics_agree_when_they_fall_as_the_preference_rises():
    shares = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]
    # mIoU rises with its share; depth error and normal angle fall with theirs: perfect control
    achieved = [[0.50, 0.90, 40.0], [0.30, 0.60, 40.0], [0.30, 0.90, 30.0]]
    assert controllability(shares, achieved, [True, False, False]) == 1.0
    # read as higher-is-better, the two error metrics would count as disobeying: (1 - 1 - 1) / 3
    assert controllability(shares, achieved) == pytest.approx(-1 / 3)
    with pytest.raises(ValueError, match="2 entries but there are 3 tasks"):
        controllability(shares, achieved, [True, False])


def test_each_dense_task_reads_its_own_metric_and_direction():
    chosen, directions = metric_choice(_dense_module(), NYU_METRICS)
    assert chosen == NYU_METRICS
    assert directions == {"segmentation": True, "depth": False, "normal": False}
    # an explicit direction overrides the metric's flag
    assert metric_choice(_dense_module(), NYU_METRICS, {"depth": True})[1]["depth"] is True


def test_bad_metric_choices_get_one_sentence():
    module = _dense_module()
    with pytest.raises(ValueError, match=r"missing \['normal'\]"):
        metric_choice(module, {"segmentation": "miou", "depth": "abs_err"})
    with pytest.raises(ValueError, match=r"unknown \['color'\]"):
        metric_choice(module, {**NYU_METRICS, "color": "acc"})
    with pytest.raises(ValueError, match="task 'depth' has no metric 'miou'"):
        metric_choice(module, "miou")
    with pytest.raises(ValueError, match=r"higher_is_better names unknown task\(s\) \['color'\]"):
        metric_choice(module, NYU_METRICS, {"color": True})
    # a metric that does not say its direction (torchmetrics' aggregators) must be told
    silent = ClassificationTask(10)
    silent.build_metrics = lambda: {"mean": MeanMetric()}  # type: ignore[method-assign]
    fake = SimpleNamespace(task_names=["t"], tasks={"t": silent})
    with pytest.raises(ValueError, match=r"give higher_is_better=\{'t': True or False\}"):
        metric_choice(fake, "mean")
    assert metric_choice(fake, "mean", {"t": False})[1] == {"t": False}


def test_grid_counts_each_dense_metric_in_its_direction(tmp_path, monkeypatch):
    module = _dense_module()
    batches = _nyuv2_batches(tmp_path / "nyuv2")

    # stand-in metrics with a known order: mIoU grows with the segmentation decoder's width, the depth error and
    # the normal angle shrink with theirs (what a trained network does)
    def known(module, batches, config, metric):
        assert metric == NYU_METRICS
        return {"segmentation": config["segmentation"], "depth": 1.0 - config["depth"],
                "normal": 90.0 * (1.0 - config["normal"])}  # fmt: skip

    monkeypatch.setattr(evaluation, "evaluate_configuration", known)
    preferences = [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]
    grid = controllability_grid(module, batches, preferences, [1.0], NYU_METRICS)
    # the preferred task's decoder is the widest, the others the narrowest
    assert [row["config"]["segmentation"] for row in grid["rows"]] == [1.0, 0.25, 0.25]
    assert grid["higher_is_better"] == {"segmentation": True, "depth": False, "normal": False}
    assert grid["controllability"][1.0] == 1.0  # read as higher-is-better it would be -1/3
    assert grid["metric"] == NYU_METRICS


@pytest.mark.slow
def test_nyuv2_recipe_writes_the_controllability_table_with_each_metric_direction(tmp_path):
    write_nyuv2(tmp_path / "nyuv2", n_train=2, n_val=2, size=(32, 32))
    tasks = ("segmentation", "depth", "normal")
    shrink = ["--model.init_args.encoder.init_args.model_name=resnet18"]
    for task in tasks:  # ResNet-18 (512 features) and heads of 8 channels: seconds on a CPU
        shrink += [f"--model.init_args.tasks.{task}.init_args.head.init_args.in_channels=512",
                   f"--model.init_args.tasks.{task}.init_args.head.init_args.width=8"]  # fmt: skip
    one_step = ["--trainer.max_steps=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
                "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--test_after_fit=false",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]  # fmt: skip
    args = ["--config", str(CONFIGS / "data/nyuv2.yaml"), "--config", str(CONFIGS / "methods/cikd.yaml")]
    root = [f"--data.init_args.root={tmp_path / 'nyuv2'}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = main(["fit", *args, *one_step, *root, *shrink])
    assert cli.trainer.global_step == 1
    table = json.loads(next(tmp_path.rglob("controllability.json")).read_text())
    assert table["metric"] == NYU_METRICS
    assert table["higher_is_better"] == {"segmentation": True, "depth": False, "normal": False}
    assert set(table["controllability"]) == {"0.25", "0.5", "1.0"}
    for row in table["rows"]:
        assert 0.0 <= row["metrics"]["segmentation"] <= 1.0 and row["metrics"]["depth"] >= 0.0
        assert 0.0 <= row["metrics"]["normal"] <= 180.0
    # each budget's value is the oriented rank agreement of the rows the table lists
    for budget, value in table["controllability"].items():
        rows = [r for r in table["rows"] if r["budget"] == float(budget)]
        achieved = [[r["metrics"][t] for t in tasks] for r in rows]
        assert value == pytest.approx(controllability([r["preference"] for r in rows], achieved, [True, False, False]))
