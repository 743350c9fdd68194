"""Random loss weighting: fresh random task weights at every step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import LossWeighting
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["RandomLossWeighting"]


@register_aggregator("rlw", "random")
class RandomLossWeighting(LossWeighting):
    """Random loss weighting (RLW).

    Lin, B., Ye, F., Zhang, Y. and Tsang, I. W. "Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning." TMLR 2022.

    Each step draws ``z ~ N(0, I_m)`` and weights the losses by ``softmax(z)`` (the paper's default
    distribution). Draws come from a generator seeded with ``(seed, step)``, so every DDP rank draws
    the same weights and a resumed run continues the same sequence (seed and count are saved).

    Args:
        seed: base seed; ``None`` draws one from torch's global generator (``seed_everything``).
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.calls = 0

    def weights(self, losses: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.calls) % (2**63 - 1))
        self.calls += 1
        z = torch.randn(losses.numel(), generator=generator)
        return torch.softmax(z, 0).to(device=losses.device, dtype=losses.dtype)

    def get_extra_state(self) -> Any:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: Any) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def hparams_for_repr(self) -> dict[str, object]:
        return {"seed": self.seed}
