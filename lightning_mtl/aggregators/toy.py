"""The toy-problem driver moved to :mod:`lightning_mtl.multitask.toy`, where it runs the gradient engine;
this old path re-exports it on first use (the aggregators never import ``multitask`` themselves)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ALL_START_POINTS",
    "LOG_LOWER",
    "NASH_MTL_SCALE",
    "PAPER_LR",
    "PAPER_STEPS",
    "QUICK_PROTOCOL",
    "START_POINTS",
    "distance_to_pareto_set",
    "log_losses",
    "loss_lower_bounds",
    "losses",
    "optimize",
    "pareto_front",
    "pareto_set",
    "pareto_x2",
    "uses_log_losses",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("lightning_mtl.multitask.toy"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
