"""How multi-task architectures plug into :class:`~lightning_mtl.multitask.module.MultiTaskModule`.

An architecture is split at the line between what several tasks use and what one task uses:

* the architecture module itself is the module's ``encoder``: every parameter in it is *shared*, that is,
  more than one task loss depends on it, so gradient methods (PCGrad, MGDA, ...) aggregate its per-task
  gradients;
* its task-specific parts (MTAN's attention masks, MMoE's gates, CGC's own experts, a cross-stitch task
  column's selection) are wrapped around each task's output head by :meth:`build_task_head`; they are
  parameters of that task's head and get that task's ordinary gradient.

The encoder may return any structure (a list of stage features, a dict); the module hands it unchanged to
every head. :meth:`MultiTaskArchitecture.attach` builds the wrapped heads into copies of the tasks, and
:class:`~lightning_mtl.multitask.MultiTaskModule` does that when its encoder is an architecture, so a YAML config only names the architecture as
the encoder.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl._constants import TaskLike

__all__ = ["MultiTaskArchitecture", "TaskHead", "reinitialized_copy"]


class MultiTaskArchitecture(nn.Module):
    """Base of the architectures: the shared part is the module, task parts come from :meth:`build_task_head`.

    Subclasses set :attr:`out_features` (the feature size each task's output head receives) and override
    :meth:`build_task_head`.
    """

    out_features: int
    returns_tensor = False  # True when forward returns one shared tensor (hard sharing)

    def build_task_head(self, name: str, head: nn.Module) -> nn.Module:
        """The task-specific part of the architecture for task ``name``, followed by its output ``head``."""
        raise NotImplementedError

    def check_tasks(self, names: list[str]) -> None:
        """Raise if the architecture was built for other tasks (architectures that need the names)."""

    def attach(self, tasks: dict[str, TaskLike]) -> dict[str, TaskLike]:
        """Copies of ``tasks`` whose heads are the architecture's task parts around each task's own head."""
        self.check_tasks(list(tasks))
        attached = {}
        for name, task in tasks.items():
            task = copy.copy(task)
            task.head = self.build_task_head(name, task.build_head(self.out_features))
            attached[name] = task
        return attached


class TaskHead(nn.Module):
    """A task's head: ``head(part(features))`` (``part`` is a task-specific module of the architecture)."""

    def __init__(self, part: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.part = part
        self.head = head

    def forward(self, features: Any) -> Tensor:
        return self.head(self.part(features))


def reinitialized_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with freshly initialized parameters (experts and task columns must not
    start identical, or they would stay interchangeable)."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return clone


def flat_inputs(x: Tensor) -> Tensor:
    """``[B, ...] -> [B, prod(...)]`` (gates look at the whole input)."""
    return torch.flatten(x, 1)
