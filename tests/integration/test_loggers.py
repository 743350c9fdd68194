"""W&B (offline) and TensorBoard through the CLI config fragments."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    logged = ("train/left/loss", "train/right/loss", "val/left/acc", "val/right/acc", "val/mean/acc", "best/val/mean/acc")
    for key in logged:
        assert key in dict(run.summary), key
    run_file = Path(run.dir).parent / f"run-{run.id}.wandb"
    run.finish()
    assert run_file.is_file()  # the offline record log that `wandb sync` uploads later


def test_tensorboard_fragment_writes_event_files(tmp_path):
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config",
                str(ROOT / "configs/loggers/tensorboard.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}", *SHORT])  # fmt: skip
    assert list(Path(cli.trainer.log_dir).glob("events.out.tfevents.*"))
