"""Width configurations and the sandwich-rule sampler that draws them during training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_mtl.controllable.layers import check_width_mults

__all__ = ["ConfigurationSampler", "WidthConfig"]

WidthConfig = dict[str, float]
"""A runtime configuration: ``{"encoder": w, <task>: w, ...}`` width multipliers."""

ENCODER = "encoder"


class ConfigurationSampler(nn.Module):
    """Draws the width configurations of one training step by the sandwich rule.

    Yu and Huang, "Universally Slimmable Networks and Improved Training Techniques", ICCV 2019: each step trains
    the widest configuration, the narrowest one and ``num_random`` configurations drawn at random (here the
    encoder's width and every decoder's width independently and uniformly from their width sets).

    The draws come from a generator seeded from ``(seed, calls)``: the state is two integers, saved in the
    module's ``state_dict`` (a resumed run draws what the uninterrupted run drew), and every DDP rank, holding the
    same state, draws the same configurations without communicating.

    Args:
        task_names: the tasks, each with its own decoder width.
        encoder_widths: the encoder's width multipliers.
        decoder_widths: the decoders' width multipliers.
        num_random: random configurations per step besides the widest and the narrowest.
        seed: seed of the draws.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        encoder_widths: Sequence[float],
        decoder_widths: Sequence[float],
        num_random: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_random < 0:
            raise ValueError(f"num_random must be >= 0, got {num_random}")
        if ENCODER in task_names:
            raise ValueError(f"{ENCODER!r} names the encoder's width; give the task another name")
        self.task_names = tuple(task_names)
        self.encoder_widths = check_width_mults(encoder_widths, "encoder_widths")
        self.decoder_widths = check_width_mults(decoder_widths, "decoder_widths")
        self.num_random = int(num_random)
        self.seed = int(seed)
        self.calls = 0

    def widest(self) -> WidthConfig:
        return self._uniform(self.encoder_widths[-1], self.decoder_widths[-1])

    def narrowest(self) -> WidthConfig:
        return self._uniform(self.encoder_widths[0], self.decoder_widths[0])

    def _uniform(self, encoder: float, decoder: float) -> WidthConfig:
        return {ENCODER: encoder, **{name: decoder for name in self.task_names}}

    def sandwich(self) -> list[WidthConfig]:
        """The step's configurations: the widest first (the distillation teacher), the narrowest, then the random
        ones."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        self.calls += 1
        configs = [self.widest(), self.narrowest()]
        for _ in range(self.num_random):
            picks = torch.randint(0, 1 << 30, (1 + len(self.task_names),), generator=generator).tolist()
            config = {ENCODER: self.encoder_widths[picks[0] % len(self.encoder_widths)]}
            for name, pick in zip(self.task_names, picks[1:]):
                config[name] = self.decoder_widths[pick % len(self.decoder_widths)]
            configs.append(config)
        return configs

    def check(self, config: Mapping[str, float]) -> WidthConfig:
        """``config`` with every key known and every width one of the trained widths (else a ``ValueError``)."""
        expected = {ENCODER, *self.task_names}
        if set(config) != expected:
            raise ValueError(f"a width configuration needs exactly the keys {sorted(expected)}, got {sorted(config)}")
        for key, width in config.items():
            allowed = self.encoder_widths if key == ENCODER else self.decoder_widths
            if float(width) not in allowed:
                raise ValueError(f"width {width} for {key!r} is not one of the trained widths {allowed}")
        return {key: float(width) for key, width in config.items()}

    def get_extra_state(self) -> Any:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: Any) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def extra_repr(self) -> str:
        return (
            f"encoder_widths={self.encoder_widths}, decoder_widths={self.decoder_widths}, "
            f"num_random={self.num_random}, seed={self.seed}"
        )
