"""Helpers shared by the benchmark scripts: a synchronizing clock, timed Trainer runs and the closing JSON line."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


class StepClock(pl.Callback):
    """Records ``now`` at the end of every training batch."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_train_batch_end(self, *args: Any) -> None:
        self.stamps.append(now(self.device))


def timed_fit(
    module: pl.LightningModule,
    batches: list,
    device: torch.device,
    callbacks: Sequence[pl.Callback] = (),
    precision: str | None = None,
) -> list[float]:
    """Fit ``module`` on ``batches`` (one step each, no validation, logging or checkpoints) under the
    Trainer; one timestamp per finished step."""
    clock = StepClock(device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_steps=len(batches), limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, clock], precision=precision, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return clock.stamps


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def per_step(stamps: list[float], warmup: int) -> float:
    """Median of the step-to-step times after ``warmup`` steps: a shared machine's stalls hit single steps,
    not the median."""
    timed = stamps[warmup:]
    return median([b - a for a, b in zip(timed, timed[1:])])


def emit(figures: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object with all figures."""
    print(json.dumps(figures, sort_keys=True))
