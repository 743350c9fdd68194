"""Moved to :mod:`lightning_mtl.continual.anytime` (the family owns its callbacks); kept so old imports and config
class paths still work."""

from lightning_mtl.continual.anytime import AnytimeEvaluation, evaluation_plan

__all__ = ["AnytimeEvaluation", "evaluation_plan"]
