"""Injected LR schedulers keep the horizon their config gave them; say so when the Trainer's run differs."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

# the argument that fixes each scheduler's horizon (in scheduler steps)
HORIZONS = {
    torch.optim.lr_scheduler.CosineAnnealingLR: "T_max",
    torch.optim.lr_scheduler.OneCycleLR: "total_steps",
    torch.optim.lr_scheduler.PolynomialLR: "total_iters",
}


def check_horizon(module: pl.LightningModule, config: dict[str, Any], key: str = "lr_scheduler") -> dict[str, Any]:
    """Warns when ``config["scheduler"]`` anneals over a horizon other than the Trainer's run: ``max_epochs``
    for ``interval: epoch``, ``estimated_stepping_batches`` for ``interval: step`` (a recipe's ``T_max: 6``
    under ``--trainer.max_epochs 1`` would stop at a high rate). ``key`` is the module's argument that
    injected the scheduler, named in the warning. Returns ``config``."""
    trainer = module._trainer
    scheduler = config.get("scheduler")
    name = next((arg for cls, arg in HORIZONS.items() if isinstance(scheduler, cls)), None)
    if trainer is None or name is None or trainer.fast_dev_run:  # type: ignore[attr-defined]  # set by Lightning's connector
        return config
    if config.get("interval", "epoch") == "step":
        run, what = trainer.estimated_stepping_batches, "estimated_stepping_batches"
    elif trainer.max_steps == -1 and trainer.max_epochs is not None and trainer.max_epochs > 0:
        run, what = trainer.max_epochs, "max_epochs"
    else:  # a run bounded by max_steps: its length in epochs is not a setting to compare with
        return config
    run = run // config.get("frequency", 1)  # the scheduler steps once every `frequency` intervals
    horizon = getattr(scheduler, name)
    if math.isfinite(run) and int(run) != horizon:
        rank_zero_warn(
            f"{type(scheduler).__name__} anneals over {name}={horizon} but the Trainer runs {what}={int(run)}: "
            f"the schedule will {'stop short of' if horizon > run else 'run past'} its end. Set "
            f"model.init_args.{key}.init_args.{name} to {int(run)} (or change the Trainer's length)."
        )
    return config
