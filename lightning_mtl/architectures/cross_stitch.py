"""Cross-stitch networks: one network column per task, mixed after every stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtl.architectures._base import MultiTaskArchitecture, TaskHead, reinitialized_copy

__all__ = ["CrossStitch"]


class _Pick(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return features[self.name]


class CrossStitch(MultiTaskArchitecture):
    """Cross-stitch network: a copy of the backbone per task, with learned linear mixing between stages.

    Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016. The
    backbone is cut into stages (the children of an ``nn.Sequential``); each task gets its own copy
    (re-initialized). After stage ``s`` the task features are mixed, ``x_t <- sum_u alpha^s_tu x_u``, with a
    learned ``T x T`` matrix ``alpha^s`` initialized to ``self_weight`` on the diagonal and
    ``(1 - self_weight) / (T - 1)`` elsewhere (0.9 / 0.1 in the paper).

    Every column feeds every task through the stitches, so the whole network is shared for the gradient
    methods; the task part is only the selection of the task's column and its head.

    Args:
        backbone: an ``nn.Sequential`` whose children are the stages.
        tasks: the task names, one column each.
        out_features: size of the last stage's output; read from ``backbone.out_features`` or the last
            stage's ``out_features`` when not given.
        self_weight: initial weight of a column's own features.
    """

    def __init__(
        self, backbone: nn.Sequential, tasks: Sequence[str], out_features: int | None = None, self_weight: float = 0.9
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Sequential) or len(backbone) == 0:
            raise TypeError("CrossStitch needs an nn.Sequential backbone whose children are the stages")
        if len(tasks) < 2:
            raise ValueError(f"CrossStitch needs at least two tasks, got {list(tasks)}")
        self.tasks = list(tasks)
        self.columns = nn.ModuleDict({t: reinitialized_copy(backbone) for t in self.tasks})
        n, stages = len(self.tasks), len(backbone)
        other = (1.0 - self_weight) / (n - 1)
        init = torch.full((n, n), other) + torch.eye(n) * (self_weight - other)
        self.alphas = nn.Parameter(init.repeat(stages, 1, 1))
        size = out_features or getattr(backbone, "out_features", None) or getattr(backbone[-1], "out_features", None)
        if not isinstance(size, int):
            raise ValueError("cannot tell the output size of the backbone: give out_features")
        self.out_features = size

    def check_tasks(self, names: list[str]) -> None:
        if sorted(names) != sorted(self.tasks):
            raise ValueError(f"CrossStitch was built for tasks {self.tasks}, the module has {names}")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = [x] * len(self.tasks)
        for s in range(self.alphas.shape[0]):
            out = torch.stack([self.columns[t][s](f) for t, f in zip(self.tasks, features)], 0)  # type: ignore[index]  # nested ModuleDict / ModuleList items are typed Module
            mixed = torch.einsum("tu,u...->t...", self.alphas[s], out)
            features = list(mixed.unbind(0))
        return dict(zip(self.tasks, features))

    def build_task_head(self, name: str, head: nn.Module) -> nn.Module:
        return TaskHead(_Pick(name), head)
