"""Constants and structural types that several families share (floor 0: imports no family).

The data modules write :data:`MISSING_LABEL` and the architectures build heads for :class:`TaskLike`
objects without importing the multi-task family that defines the tasks themselves.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

__all__ = ["MISSING_LABEL", "TaskLike"]

MISSING_LABEL = -100
"""Sentinel for a missing integer label (float labels use ``NaN``)."""


class TaskLike(Protocol):
    """What an architecture needs of a task: an output head it may replace and a way to build one."""

    head: nn.Module | None

    def build_head(self, in_features: int) -> nn.Module:
        """The task's output head for features of size ``in_features``."""
        ...
