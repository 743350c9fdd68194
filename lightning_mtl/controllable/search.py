"""The budget search: (compute budget, task preference) -> a width configuration of the trained network."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.controllable.flops import configuration_flops
from lightning_mtl.controllable.sampler import ENCODER, WidthConfig

__all__ = ["BudgetSearch", "normalize_preference"]


def normalize_preference(
    preference: Sequence[float] | Mapping[str, float], task_names: Sequence[str]
) -> dict[str, float]:
    """A preference over the tasks as ``{task: share}`` with shares that sum to 1 (a sequence follows
    ``task_names``' order)."""
    if isinstance(preference, Mapping):
        unknown = sorted(set(preference) - set(task_names))
        if unknown:
            raise ValueError(f"preference names unknown task(s) {unknown}; the tasks are {list(task_names)}")
        values = [float(preference.get(name, 0.0)) for name in task_names]
    else:
        values = [float(v) for v in preference]
        if len(values) != len(task_names):
            raise ValueError(f"preference has {len(values)} entries but there are {len(task_names)} tasks")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"preference entries must be >= 0 with a positive sum, got {values}")
    total = sum(values)
    return {name: v / total for name, v in zip(task_names, values)}


class BudgetSearch:
    """Maps a compute budget and a task preference to a width configuration, without retraining.

    Aich et al., "Efficient Controllable Multi-Task Architectures", ICCV 2023: the preference sets the decoder
    widths (a more preferred task gets a wider decoder), the budget the encoder width. Here decoder ``t`` gets
    the widest trained width that is at most ``p_t / max(p)`` (the most preferred task the full decoder, and
    never less than the narrowest width); among the encoder widths whose configuration fits the budget the
    search takes the one with the best ``score`` (for instance a validation score weighted by the
    preference), or the widest one without a score. If no encoder width fits, the decoders narrow one step
    at a time, least preferred first. FLOPs come from :func:`configuration_flops`, tabulated once per
    (encoder width, decoder width) pair.

    Args:
        module: a trained :class:`~lightning_mtl.controllable.ControllableMultiTaskModule`.
        inputs: an example input batch (its shape fixes the FLOP counts; one sample is enough).
        score: optional ``score(config, preference) -> float``, higher is better, to choose the encoder width.
    """

    def __init__(
        self,
        module: Any,
        inputs: Tensor,
        score: Callable[[WidthConfig, dict[str, float]], float] | None = None,
    ) -> None:
        self.module = module
        self.task_names: tuple[str, ...] = tuple(module.task_names)
        self.encoder_widths: tuple[float, ...] = module.sampler.encoder_widths
        self.decoder_widths: tuple[float, ...] = module.sampler.decoder_widths
        self.score = score
        self._encoder: dict[float, int] = {}
        self._decoder: dict[tuple[str, float, float], int] = {}
        for e in self.encoder_widths:
            for d in self.decoder_widths:
                config = {ENCODER: e, **{name: d for name in self.task_names}}
                counts = configuration_flops(module, config, inputs)
                self._encoder[e] = counts[ENCODER]
                for name in self.task_names:
                    self._decoder[name, e, d] = counts[name]
        self.max_flops = self.flops(module.sampler.widest())
        self.min_flops = self.flops(module.sampler.narrowest())

    def flops(self, config: Mapping[str, float]) -> int:
        """FLOPs of a configuration (from the table)."""
        e = float(config[ENCODER])
        return self._encoder[e] + sum(self._decoder[name, e, float(config[name])] for name in self.task_names)

    def decoder_widths_for(self, preference: Mapping[str, float]) -> dict[str, float]:
        """The preference rule: the widest trained width at most ``p_t / max(p)`` for each task."""
        top = max(preference.values())
        widths = {}
        for name in self.task_names:
            target = preference[name] / top
            fitting = [w for w in self.decoder_widths if w <= target + 1e-9]
            widths[name] = fitting[-1] if fitting else self.decoder_widths[0]
        return widths

    def search(self, budget: float, preference: Sequence[float] | Mapping[str, float]) -> WidthConfig:
        """The configuration for ``budget`` (a fraction of the widest configuration's FLOPs, in ``(0, 1]``) and
        ``preference`` (non-negative, one entry per task).

        Raises:
            ValueError: the budget is below the narrowest configuration's FLOPs, or the preference is malformed.
        """
        if not 0 < budget <= 1:
            raise ValueError(f"budget is a fraction of the widest network's FLOPs in (0, 1], got {budget}")
        shares = normalize_preference(preference, self.task_names)
        limit = budget * self.max_flops
        if limit < self.min_flops:
            raise ValueError(
                f"budget {budget:g} ({limit:.0f} FLOPs) is below the narrowest configuration's {self.min_flops} FLOPs "
                f"({self.min_flops / self.max_flops:.3f} of the widest)"
            )
        decoders = self.decoder_widths_for(shares)
        # least preferred first: the order in which decoders give way when nothing fits
        order = sorted(self.task_names, key=lambda name: shares[name])
        while True:
            fitting = [
                {ENCODER: e, **decoders} for e in self.encoder_widths if self.flops({ENCODER: e, **decoders}) <= limit
            ]
            if fitting:
                if self.score is None:
                    return fitting[-1]
                score = self.score
                return max(fitting, key=lambda config: score(config, shares))
            decoders = self._narrow_one_step(decoders, order)

    def _narrow_one_step(self, decoders: dict[str, float], order: Sequence[str]) -> dict[str, float]:
        for name in order:
            index = self.decoder_widths.index(decoders[name])
            if index > 0:
                return {**decoders, name: self.decoder_widths[index - 1]}
        raise AssertionError("the narrowest configuration fits the budget (checked above)")  # pragma: no cover

    def table(self) -> Tensor:
        """FLOPs of every uniform configuration ``[encoder widths, decoder widths]`` (for plots and checks)."""
        return torch.tensor(
            [[self.flops({ENCODER: e, **{n: d for n in self.task_names}}) for d in self.decoder_widths]
             for e in self.encoder_widths]
        )  # fmt: skip
