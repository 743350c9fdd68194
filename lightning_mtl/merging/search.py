"""Pick the merge coefficient ``lambda`` by validating each candidate with the Trainer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from lightning_mtl.merging.task_vector import TaskVector

if TYPE_CHECKING:  # the search drives a Trainer it is given; importing the family loads no Lightning
    import lightning.pytorch as pl

__all__ = ["CoefficientSearch", "search_coefficient"]


@dataclass
class CoefficientSearch:
    """The outcome of :func:`search_coefficient`: the best coefficient, its metric and every score."""

    best_coef: float
    best_value: float
    metric: str
    mode: str
    scores: dict[float, float] = field(default_factory=dict)


def search_coefficient(
    model: pl.LightningModule,
    vector: Mapping[str, Tensor],
    grid: Sequence[float],
    trainer: pl.Trainer,
    datamodule: pl.LightningDataModule | None = None,
    dataloaders: Any = None,
    metric: str = "val/mean/acc",
    mode: Literal["max", "min"] = "max",
) -> CoefficientSearch:
    """Validate ``theta_0 + lambda * vector`` for every ``lambda`` in ``grid`` and keep the best.

    ``model`` holds ``theta_0`` when called; it is left holding the best merged weights. Each candidate
    is one ``trainer.validate`` run, so the Trainer's flags (devices, precision, ``limit_val_batches``)
    apply; the first of equally good coefficients wins.

    Args:
        model: the module holding the pre-trained weights ``theta_0``.
        vector: the merged task vector (a :class:`TaskVector` or any name -> tensor mapping).
        grid: candidate coefficients (e.g. ``[0.1, 0.2, ..., 1.0]``).
        trainer: the Trainer that validates.
        datamodule: the data module whose validation set scores the candidates.
        dataloaders: validation dataloaders instead of a data module.
        metric: the logged key to compare (e.g. ``"val/mean/acc"``).
        mode: ``"max"`` or ``"min"``: whether higher or lower ``metric`` is better.

    Raises:
        ValueError: an empty grid, an unknown mode, or a metric the validation did not log (the logged
            keys are listed).
    """
    if not grid:
        raise ValueError("the coefficient grid is empty; give at least one coefficient")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    tau = vector if isinstance(vector, TaskVector) else TaskVector(vector)
    base = {key: value.detach().clone() for key, value in model.state_dict().items() if key in tau}
    scores: dict[float, float] = {}
    for coef in grid:
        model.load_state_dict(tau.apply_to(base, float(coef)), strict=False)
        results = trainer.validate(model, dataloaders=dataloaders, datamodule=datamodule, verbose=False)
        logged = {key: value for result in results for key, value in result.items()}
        if metric not in logged:
            raise ValueError(f"validation logged no {metric!r}; logged keys: {', '.join(sorted(logged)) or 'none'}")
        scores[float(coef)] = float(logged[metric])
    sign = 1.0 if mode == "max" else -1.0
    finite = {c: v for c, v in scores.items() if not math.isnan(v)} or scores
    best = max(finite, key=lambda c: sign * finite[c])  # max() keeps the first of equal values
    model.load_state_dict(tau.apply_to(base, best), strict=False)
    return CoefficientSearch(best_coef=best, best_value=scores[best], metric=metric, mode=mode, scores=scores)
