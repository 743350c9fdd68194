"""CGC and PLE: shared and task-specific experts, gated per task (one or several extraction levels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.architectures._base import MultiTaskArchitecture, TaskHead, flat_inputs, reinitialized_copy
from lightning_mtl.architectures.mmoe import mix

__all__ = ["CGC", "PLE"]


def _experts(template: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(reinitialized_copy(template) for _ in range(n))


def _run(experts: nn.ModuleList, x: Tensor) -> Tensor:
    return torch.stack([expert(x) for expert in experts], 1)


class _LastLevel(nn.Module):
    """Task ``t``'s part: (for PLE) its gate of the level before, then its own last-level experts and the
    gate that mixes them with the shared experts."""

    def __init__(self, name: str, experts: nn.ModuleList, gate_in: int, num_shared: int, prev_gate: nn.Module | None):
        super().__init__()
        self.name = name
        self.prev_gate = prev_gate
        self.experts = experts
        self.gate = nn.Linear(gate_in, len(experts) + num_shared)

    def forward(self, features: dict) -> Tensor:
        if self.prev_gate is None:
            x = features["input"]
        else:
            x = mix(self.prev_gate(flat_inputs(features["gate_input"][self.name])), features["candidates"][self.name])
        candidates = torch.cat([_run(self.experts, x), features["shared"]], 1)
        return mix(self.gate(flat_inputs(x)), candidates)


class PLE(MultiTaskArchitecture):
    """Progressive Layered Extraction: levels of shared and task-specific experts with per-task gates.

    Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
    for Personalized Recommendations", RecSys 2020. At every level each task has ``num_specific`` experts
    and all tasks have ``num_shared``; task ``t``'s gate mixes its own and the shared experts into its input
    for the next level, and (except at the last level) a shared gate mixes all experts into the shared input
    of the next level. The first level's experts are copies of ``expert`` on the input; deeper levels' are
    copies of ``hidden_expert`` (default: linear + ReLU on the ``out_features`` vector).

    Shared (aggregated by gradient methods): every parameter that more than one task loss depends on, that is
    all shared experts and gates, the task experts of every level but the last (they feed the shared gate),
    and the task gates of every level but the last two. Task part of task ``t`` (ordinary gradients): its
    last-level experts and gate and its gate of the level before, whose output only task ``t`` reads.

    Args:
        expert: first-level expert network.
        in_features: size of the flattened input (the first level's gates see it).
        tasks: the task names (levels before the last hold per-task experts); needed when ``num_levels > 1``.
        num_levels: extraction levels (1 is CGC).
        num_specific: experts per task and level.
        num_shared: shared experts per level.
        out_features: expert output size; read from ``expert.out_features`` when not given.
        hidden_expert: expert of the deeper levels (input and output ``out_features``).
    """

    def __init__(
        self,
        expert: nn.Module,
        in_features: int,
        tasks: Sequence[str] | None = None,
        num_levels: int = 2,
        num_specific: int = 1,
        num_shared: int = 1,
        out_features: int | None = None,
        hidden_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_levels < 1 or num_specific < 1 or num_shared < 1:
            raise ValueError("PLE needs num_levels, num_specific and num_shared >= 1")
        if num_levels > 1 and not tasks:
            raise ValueError("PLE with num_levels > 1 needs the task names (`tasks`): lower levels hold task experts")
        size = out_features or getattr(expert, "out_features", None)
        if not isinstance(size, int):
            raise ValueError(f"cannot tell the output size of expert {type(expert).__name__}: give out_features")
        self.out_features = size
        self.in_features = int(in_features)
        self.tasks = list(tasks or [])
        self.num_levels, self.num_specific, self.num_shared = int(num_levels), int(num_specific), int(num_shared)
        hidden = hidden_expert if hidden_expert is not None else nn.Sequential(nn.Linear(size, size), nn.ReLU())

        def template(level: int) -> nn.Module:
            return expert if level == 0 else hidden

        def gate_in(level: int) -> int:
            return self.in_features if level == 0 else size

        n_tasks = len(self.tasks)
        lower = range(num_levels - 1)
        self.task_experts = nn.ModuleList(
            nn.ModuleDict({t: _experts(template(lv), num_specific) for t in self.tasks}) for lv in lower
        )
        self.shared_experts = nn.ModuleList(_experts(template(lv), num_shared) for lv in range(num_levels))
        # task gates of the levels below the one before the last: their output feeds shared gates later on
        self.task_gates = nn.ModuleList(
            nn.ModuleDict({t: nn.Linear(gate_in(lv), num_specific + num_shared) for t in self.tasks})
            for lv in range(max(num_levels - 2, 0))
        )
        self.shared_gates = nn.ModuleList(nn.Linear(gate_in(lv), n_tasks * num_specific + num_shared) for lv in lower)
        self._template = (template(num_levels - 1),)  # a tuple: the template itself is not a parameter
        self._last_gate_in = gate_in(num_levels - 1)
        self._prev_gate_in = gate_in(num_levels - 2) if num_levels > 1 else 0

    def check_tasks(self, names: list[str]) -> None:
        if self.num_levels > 1 and sorted(names) != sorted(self.tasks):
            raise ValueError(f"{type(self).__name__} was built for tasks {self.tasks}, the module has {names}")

    def forward(self, x: Tensor) -> dict:
        if flat_inputs(x).shape[1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} was built for inputs of {self.in_features} values, got {tuple(x.shape[1:])}"
            )
        task_x = {t: x for t in self.tasks}
        shared_x = x
        out: dict = {"input": x}
        for level in range(self.num_levels - 1):
            own = {t: _run(self.task_experts[level][t], task_x[t]) for t in self.tasks}  # type: ignore[index]  # nested ModuleDict / ModuleList items are typed Module
            shared = _run(self.shared_experts[level], shared_x)  # type: ignore[arg-type]  # ModuleList items are typed Module
            candidates = {t: torch.cat([own[t], shared], 1) for t in self.tasks}
            if level == self.num_levels - 2:  # the task gates of this level belong to the task parts
                out["gate_input"], out["candidates"] = task_x, candidates
            else:
                task_x = {t: mix(self.task_gates[level][t](flat_inputs(task_x[t])), candidates[t]) for t in self.tasks}  # type: ignore[index]  # nested ModuleDict / ModuleList items are typed Module
            every = torch.cat([*own.values(), shared], 1)
            shared_x = mix(self.shared_gates[level](flat_inputs(shared_x)), every)
        out["shared"] = _run(self.shared_experts[-1], shared_x)  # type: ignore[arg-type]  # ModuleList items are typed Module
        return out

    def build_task_head(self, name: str, head: nn.Module) -> nn.Module:
        prev = None
        if self.num_levels > 1:
            prev = nn.Linear(self._prev_gate_in, self.num_specific + self.num_shared)
        experts = _experts(self._template[0], self.num_specific)
        return TaskHead(_LastLevel(name, experts, self._last_gate_in, self.num_shared, prev), head)


class CGC(PLE):
    """Customized Gate Control: one level of PLE, task-specific experts next to shared ones.

    Tang, Liu, Zhao and Gong, "Progressive Layered Extraction (PLE)", RecSys 2020 (CGC is its single-level
    building block). Task ``t``'s gate (on the flattened input) mixes its ``num_specific`` own experts and
    the ``num_shared`` shared ones. Shared: the shared experts. Task part: own experts, gate, head.

    Args:
        expert: the expert network (copied per expert, re-initialized).
        in_features: size of the flattened input the gates see.
        num_specific: experts per task.
        num_shared: shared experts.
        out_features: expert output size; read from ``expert.out_features`` when not given.
    """

    def __init__(
        self,
        expert: nn.Module,
        in_features: int,
        num_specific: int = 1,
        num_shared: int = 1,
        out_features: int | None = None,
    ) -> None:
        super().__init__(expert, in_features, None, 1, num_specific, num_shared, out_features)
