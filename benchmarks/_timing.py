"""Helpers shared by the benchmark scripts: a synchronizing clock and the closing JSON line."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def emit(figures: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object with all figures."""
    print(json.dumps(figures, sort_keys=True))
