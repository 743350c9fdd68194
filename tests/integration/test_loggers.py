"""W&B (offline) and TensorBoard through the CLI config fragments."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_mtl.aggregators import get_aggregator_class
from lightning_mtl.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.enable_progress_bar=false", "--test_after_fit=false", "--data.init_args.num_train=512",
         "--trainer.log_every_n_steps=1"]  # fmt: skip


def test_wandb_offline_run_gets_config_metrics_and_best_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / "configs/loggers/wandb.yaml"),
                f"--trainer.logger.init_args.save_dir={tmp_path}", *SHORT])  # fmt: skip
    run = cli.trainer.logger.experiment
    assert run.config["model"]["init_args"]["tasks"]["left"]["init_args"]["num_classes"] == 10
    assert run.config["trainer"]["max_epochs"] == 2
    best = cli.trainer.callbacks  # BestMetricsSummary is forced into every CLI run
    tracker = next(c for c in best if type(c).__name__ == "BestMetricsSummary")
    assert run.summary["best/val/left/acc"] == pytest.approx(tracker.best["val/left/acc"])
    logged = (
        "train/left/loss",
        "train/right/loss",
        "val/left/acc",
        "val/right/acc",
        "val/mean/acc",
        "best/val/mean/acc",
    )
    for key in logged:
        assert key in dict(run.summary), key
    run_file = Path(run.dir).parent / f"run-{run.id}.wandb"
    run.finish()
    assert run_file.is_file()  # the offline record log that `wandb sync` uploads later


def test_tensorboard_fragment_writes_event_files(tmp_path):
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                str(ROOT / "configs/loggers/tensorboard.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}", *SHORT])  # fmt: skip
    assert list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))


TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.init_args.num_train=128", "--data.init_args.batch_size=64", "--trainer.log_every_n_steps=1"]  # fmt: skip


def _quickstart() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_the_report_reads_a_run_of_every_logger(logger, tmp_path, monkeypatch):
    """Every CLI run leaves run_summary.json in its folder; the report reads it whatever the logger."""
    import json

    from lightning_mtl.report import build_rows, find_runs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(ROOT / f"configs/loggers/{logger}.yaml"),
                f"--trainer.logger.init_args.save_dir={tmp_path}", "--test_after_fit=true", *TINY])  # fmt: skip
    if logger == "wandb":
        cli.trainer.logger.experiment.finish()
    runs = find_runs(tmp_path)
    assert len(runs) == 1 and Path(runs[0].source).name == "run_summary.json"
    _, rows = build_rows(runs)
    assert rows[0]["stage"] == "test"
    for task in ("left", "right"):
        assert rows[0][f"{task}/acc"] == pytest.approx(float(cli.trainer.callback_metrics[f"test/{task}/acc"]))
    summary = json.loads(Path(runs[0].source).read_text())
    tracker = next(c for c in cli.trainer.callbacks if type(c).__name__ == "BestMetricsSummary")
    assert summary["best"] == pytest.approx({f"best/{k}": v for k, v in tracker.best.items()})
    config = _quickstart()["model"]["init_args"]
    # the short name, resolved to its class path when the config is parsed
    assert (
        summary["config"]["model.aggregator"].rsplit(".", 1)[-1] == get_aggregator_class(config["aggregator"]).__name__
    )
    assert summary["config"]["model.optimizer.lr"] == config["optimizer"]["init_args"]["lr"]


def test_tensorboard_gets_the_hyperparameters_and_the_learning_rate(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                str(ROOT / "configs/loggers/tensorboard.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--test_after_fit=true", *TINY])  # fmt: skip
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert any(tag.startswith("lr-") for tag in events.Tags()["scalars"])
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    config = _quickstart()["model"]["init_args"]
    assert (
        hparams["model.aggregator"].string_value.rsplit(".", 1)[-1]
        == get_aggregator_class(config["aggregator"]).__name__
    )
    assert hparams["model.optimizer.lr"].number_value == pytest.approx(config["optimizer"]["init_args"]["lr"])
    # the HParams tab pairs each run with its main metric (the checkpoint's monitor), logged as a scalar
    monitor = _quickstart()["trainer"]["callbacks"][0]["init_args"]["monitor"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    ).experiment
    assert monitor in [m.name.tag for m in experiment.metric_infos] and monitor in events.Tags()["scalars"]


def test_csv_hparams_hold_the_aggregator_and_the_learning_rate(tmp_path):
    import csv

    import yaml

    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--test_after_fit=false", *TINY])  # fmt: skip
    hparams = yaml.safe_load((Path(cli.trainer.log_dir) / "hparams.yaml").read_text())
    config = _quickstart()["model"]["init_args"]
    assert hparams["model.aggregator"].rsplit(".", 1)[-1] == get_aggregator_class(config["aggregator"]).__name__
    assert hparams["model.optimizer.lr"] == config["optimizer"]["init_args"]["lr"]
    with open(Path(cli.trainer.log_dir) / "metrics.csv", newline="") as f:
        rates = [float(r["lr-Adam"]) for r in csv.DictReader(f) if r.get("lr-Adam")]
    assert rates and rates[0] == pytest.approx(config["optimizer"]["init_args"]["lr"])
