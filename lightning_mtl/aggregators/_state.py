"""State helpers shared by stateful aggregators: seeded task orders and lazily-shaped buffers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SeededOrders", "resize_lazy_buffers", "sample_orders"]


def sample_orders(m: int, generator: torch.Generator) -> Tensor:
    """For every task ``i`` a uniformly random order of the other tasks: a ``[m, m - 1]`` tensor.

    Row ``i`` is a random permutation of ``{0..m-1} \\ {i}`` (drawn on the CPU generator; ``m`` is
    small).
    """
    keys = torch.rand(m, m, generator=generator, dtype=torch.float64)
    keys.fill_diagonal_(2.0)  # task i sorts last and is cut off
    return keys.argsort(dim=1)[:, : m - 1]


class SeededOrders:
    """Mixin: reproducible random task orders, saved in ``state_dict``.

    Each call draws from a fresh CPU generator seeded with ``(seed, number of calls so far)``: no
    generator object is kept, so the module pickles (``ddp_spawn``) and deep-copies cleanly, every
    DDP rank draws the same orders, and the seed and call count travel as module "extra state", so
    a run resumed from a checkpoint draws the same orders as an uninterrupted one. With
    ``seed=None`` the seed is drawn from torch's global generator at construction, so
    ``seed_everything`` makes the run reproducible too.
    """

    def _init_generator(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self.calls = 0

    def sample_orders(self, m: int) -> Tensor:
        """Draw the next ``[m, m - 1]`` visiting orders (advances the call count)."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed((self.seed * 1_000_003 + self.calls) % (2**63 - 1))
        self.calls += 1
        return sample_orders(m, generator)

    def get_extra_state(self) -> Any:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: Any) -> None:
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])


def resize_lazy_buffers(module: nn.Module, state_dict: dict[str, Any], prefix: str, names: Iterable[str]) -> None:
    """Give lazily-shaped buffers the shape stored in a checkpoint before it is copied in.

    Buffers whose shape is only known at the first call (``[m, m]``, ``[m, n]``) are registered as
    empty placeholders; call this from ``_load_from_state_dict`` so that a fresh module can load a
    checkpoint of a trained one.
    """
    for name in names:
        key = prefix + name
        if key not in state_dict:
            continue
        saved = state_dict[key]
        current = module._buffers.get(name)
        if current is None or current.shape != saved.shape or current.dtype != saved.dtype:
            device = current.device if current is not None else saved.device
            module._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=device)
