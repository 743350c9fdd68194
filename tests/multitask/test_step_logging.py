"""The per-task training values are logged only on the steps someone reads them: the loggers get the
current values every ``log_every_n_steps``, and ``callback_metrics`` holds the current ones at the end
of the run and on every step while a callback monitors one of them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import Logger

from tests.fixtures.trainers import one_thread, tiny_module, tiny_multidigits, tiny_trainer  # noqa: F401

TASK_KEYS = ("train/left/loss", "train/right/loss")


class _Recorder(Logger):
    """Keeps every ``log_metrics`` call: (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _Watch(pl.Callback):
    """Monitors a per-task key (as ModelCheckpoint or EarlyStopping would) and reads the callback
    metrics after every training batch."""

    monitor = "train/left/loss"

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.seen.append({key: float(metrics[key]) for key in (*TASK_KEYS, "train/loss")})


def _sums_to_total(metrics) -> bool:
    # linear scalarization with unit weights: train/loss is the sum of the task losses of the same step
    return float(metrics["train/loss"]) == pytest.approx(sum(float(metrics[key]) for key in TASK_KEYS), rel=1e-5)


def test_loggers_get_the_current_task_losses_every_log_every_n_steps():
    recorder = _Recorder()
    trainer = tiny_trainer(logger=recorder, log_every_n_steps=2, limit_train_batches=7, limit_val_batches=0)
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    train_calls = [(step, m) for step, m in recorder.calls if "train/loss" in m]
    assert [step for step, _ in train_calls] == [1, 3, 5]
    for _, metrics in train_calls:
        assert set(TASK_KEYS) <= set(metrics)
        assert _sums_to_total(metrics)
    # the run's last step (not a logger step) still leaves its own values in callback_metrics
    assert _sums_to_total(trainer.callback_metrics)


def test_a_monitored_task_loss_is_current_on_every_step():
    watch = _Watch()
    trainer = tiny_trainer(callbacks=[watch], log_every_n_steps=50, limit_train_batches=5, limit_val_batches=0)
    trainer.fit(tiny_module(), datamodule=tiny_multidigits())
    assert len(watch.seen) == 5
    assert all(_sums_to_total(metrics) for metrics in watch.seen)
    assert len({metrics["train/left/loss"] for metrics in watch.seen}) == 5  # a new value each step
