"""GradDrop: per coordinate, keep only the gradients of one randomly chosen sign."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.aggregators.base import JacobianAggregator
from lightning_mtl.aggregators.registry import register_aggregator

__all__ = ["GradDrop"]


@register_aggregator("graddrop")
class GradDrop(JacobianAggregator):
    """Gradient sign dropout.

    Chen, Z., Ngiam, J., Huang, Y., Luong, T., Kretzschmar, H., Chai, Y. and Anguelov, D. "Just
    Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout." NeurIPS 2020.

    For every coordinate ``k`` of the Jacobian the positive sign purity
    ``P_k = 1/2 (1 + sum_i J_ik / sum_i |J_ik|)`` is computed and one ``U_k ~ Uniform[0, 1)`` is
    drawn; if ``U_k < P_k`` the positive entries of column ``k`` are kept, otherwise the negative
    ones, and the update is the sum of the kept entries: ``d_k = sum_i M_ik J_ik``. Columns where
    all tasks agree in sign are never changed. With a leakage ``l_i`` task ``i`` contributes
    ``(l_i + (1 - l_i) M_ik) J_ik`` (``l_i = 1`` never drops task ``i``; the paper uses it for
    transfer learning from auxiliary tasks).

    Notes:
        The paper applies the method to the gradients w.r.t. an activation layer (before the
        shared trunk's backward pass), with ``P`` computed from the gradients summed over the batch
        dimension and the mask broadcast over the batch. This version operates on whatever
        Jacobian the engine passes: at the parameter level each parameter coordinate is one
        column; at the representation level the engine decides whether batch entries are summed.

    Randomness: ``U`` is drawn on the Jacobian's device from a generator that is reseeded at every
    call from ``(seed, call index)``, so the state to checkpoint is just the call counter (saved as
    extra state) and a resumed run draws the same masks on any device type.

    Args:
        leakage: one value in ``[0, 1]`` per task, or a single value for all; default 0 (the
            paper's multi-task setting).
        seed: base seed; ``None`` draws one from torch's global generator at construction.
    """

    def __init__(self, leakage: float | Sequence[float] = 0.0, seed: int | None = None) -> None:
        super().__init__()
        values = [float(leakage)] if isinstance(leakage, (int, float)) else [float(v) for v in leakage]
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"GradDrop leakage must be in [0, 1], got {leakage}")
        self.leakage = values
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self.calls = 0
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        gen = self._generators[key]
        gen.manual_seed((self.seed * 1_000_003 + self.calls) % (2**63 - 1))
        return gen

    def forward(self, jacobian: Tensor) -> Tensor:
        m, n = jacobian.shape
        if len(self.leakage) not in (1, m):
            raise ValueError(f"GradDrop has {len(self.leakage)} leakage values but there are {m} tasks")
        j = jacobian.detach()
        work = j if j.dtype in (torch.float32, torch.float64) else j.float()
        total = work.sum(0)
        mass = work.abs().sum(0)
        ratio = total / torch.where(mass > 0, mass, torch.ones_like(mass))  # 0 where a column is all zero
        purity = 0.5 * (1.0 + ratio)
        u = torch.rand(n, generator=self._generator(j.device), device=j.device, dtype=work.dtype)
        self.calls += 1
        keep_positive = u < purity  # [n]; otherwise the negative entries are kept
        mask = torch.where(work > 0, keep_positive[None, :], ~keep_positive[None, :]).to(work.dtype)
        if len(self.leakage) == 1:
            if self.leakage[0] != 0.0:  # a Python scalar: no host-to-device copy
                mask = self.leakage[0] + (1.0 - self.leakage[0]) * mask
        else:
            leak = torch.tensor(self.leakage, dtype=work.dtype).to(j.device, non_blocking=True)
            mask = leak[:, None] + (1.0 - leak[:, None]) * mask
        return (mask * work).sum(0).to(jacobian.dtype)

    def get_extra_state(self) -> Any:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: Any) -> None:
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])

    def hparams_for_repr(self) -> dict[str, object]:
        return {"leakage": self.leakage, "seed": self.seed}
