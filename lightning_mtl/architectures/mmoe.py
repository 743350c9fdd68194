"""MMoE: shared experts mixed by one softmax gate per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mtl.architectures._base import MultiTaskArchitecture, TaskHead, flat_inputs, reinitialized_copy

__all__ = ["MMoE", "mix"]


def mix(gate_logits: Tensor, experts: Tensor) -> Tensor:
    """Softmax-weighted sum over the expert axis: ``[B, E]`` and ``[B, E, ...]`` -> ``[B, ...]``."""
    weights = torch.softmax(gate_logits, dim=1)
    return (weights.view(*weights.shape, *([1] * (experts.ndim - 2))) * experts).sum(1)


class _Gate(nn.Module):
    """A task's gate: a linear map of the flattened input to one logit per expert, then the mixture."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return mix(self.linear(flat_inputs(features["input"])), features["experts"])


class MMoE(MultiTaskArchitecture):
    """Multi-gate Mixture-of-Experts: every task mixes the same experts with its own gate.

    Ma, Zhao, Yi, Chen, Hong and Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts", KDD 2018. ``num_experts`` copies of ``expert`` (re-initialized) see the input;
    task ``t``'s gate maps the flattened input to softmax weights over the experts and its output head
    gets the weighted sum of the expert outputs (vectors or feature maps).

    Shared (aggregated by gradient methods): the experts. Task-specific: each task's gate and head.

    Args:
        expert: the expert network (copied ``num_experts`` times), e.g. a small CNN or an MLP.
        num_experts: number of experts.
        in_features: size of the flattened input the gates see (``C * H * W`` for images).
        out_features: expert output size; read from ``expert.out_features`` when not given.
    """

    def __init__(self, expert: nn.Module, num_experts: int, in_features: int, out_features: int | None = None) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MMoE needs num_experts >= 1, got {num_experts}")
        self.experts = nn.ModuleList(reinitialized_copy(expert) for _ in range(num_experts))
        self.num_experts = int(num_experts)
        self.in_features = int(in_features)
        size = out_features or getattr(expert, "out_features", None)
        if not isinstance(size, int):
            raise ValueError(f"cannot tell the output size of expert {type(expert).__name__}: give out_features")
        self.out_features = size

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if flat_inputs(x).shape[1] != self.in_features:
            raise ValueError(f"MMoE was built for inputs of {self.in_features} values, got {tuple(x.shape[1:])}")
        return {"input": x, "experts": torch.stack([expert(x) for expert in self.experts], 1)}

    def build_task_head(self, name: str, head: nn.Module) -> nn.Module:
        return TaskHead(_Gate(self.in_features, self.num_experts), head)
