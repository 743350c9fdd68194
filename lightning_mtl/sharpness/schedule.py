"""A small schedule for SAM's radius ``rho``, usable from YAML (a class path) and from Python (a callable)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

__all__ = ["RhoSchedule", "resolve_rho"]


class RhoSchedule:
    """``rho`` as a function of the number of SAM steps taken so far.

    ``kind="constant"``: always ``start``. ``"linear"`` / ``"cosine"``: from ``start`` to ``end`` over
    ``steps`` steps, then ``end``. An optional linear warm-up from 0 to ``start`` over ``warmup_steps``
    comes first (ramping ``rho`` up, as some SAM recipes do). The schedule holds no state of its own:
    whoever steps it (the callback or the optimizer wrapper) keeps the step count in its checkpoint.

    Examples:
        >>> schedule = RhoSchedule(start=0.1, end=0.3, steps=10, kind="linear")
        >>> [round(schedule(step), 6) for step in (0, 5, 50)]
        [0.1, 0.2, 0.3]
    """

    def __init__(
        self,
        start: float,
        end: float | None = None,
        steps: int = 0,
        kind: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
    ) -> None:
        if kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"kind must be 'constant', 'linear' or 'cosine', got {kind!r}")
        if kind != "constant" and (end is None or steps < 1):
            raise ValueError(f"a {kind!r} rho schedule needs `end` and `steps` >= 1")
        if start < 0 or (end is not None and end < 0):
            raise ValueError(f"rho must be >= 0, got start={start}, end={end}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.start, self.end, self.steps, self.kind, self.warmup_steps = start, end, steps, kind, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start * (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return float(self.start)
        assert self.end is not None
        t = min(1.0, (step - self.warmup_steps) / self.steps)
        if self.kind == "cosine":
            t = 0.5 * (1 - math.cos(math.pi * t))
        return float(self.start + (self.end - self.start) * t)

    def __repr__(self) -> str:
        return (
            f"RhoSchedule(start={self.start}, end={self.end}, steps={self.steps}, kind={self.kind!r}, "
            f"warmup_steps={self.warmup_steps})"
        )


def resolve_rho(rho: float | Callable[[int], float], step: int) -> float:
    """The radius for ``step``: ``rho`` itself, or ``rho(step)`` for a schedule; checked to be >= 0."""
    value = float(rho(step)) if callable(rho) else float(rho)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {value} at SAM step {step}")
    return value
