"""Choosing what to train on: ZIP-FIT compression-based data selection and the corpus and tiny byte-level
language model of its recipe."""

from lightning_mtl.selection.byte_lm import ByteLM
from lightning_mtl.selection.stdlib_corpus import StdlibCorpus
from lightning_mtl.selection.zipfit import CompressionSelected, CompressionSelector, ncd

__all__ = ["ByteLM", "CompressionSelected", "CompressionSelector", "StdlibCorpus", "ncd"]
"""Choosing what to train on: multi-task samplers and active source sampling via Lasso."""

from lightning_mtl.selection.digits_sources import CORRUPTIONS, DigitsMLP, DigitsSources
from lightning_mtl.selection.lasso import (
    ActiveSourceSelection,
    SourceBudgetSampler,
    allocate_budgets,
    estimate_relevance,
    fit_linear_heads,
)
from lightning_mtl.selection.samplers import (
    MultiTaskBatchSampler,
    MultiTaskSampling,
    TaskBatch,
    create_task_schedule,
    largest_remainder,
    list_task_schedules,
    register_task_schedule,
)

__all__ = [
    "CORRUPTIONS",
    "ActiveSourceSelection",
    "DigitsMLP",
    "DigitsSources",
    "SourceBudgetSampler",
    "allocate_budgets",
    "estimate_relevance",
    "fit_linear_heads",
    "MultiTaskBatchSampler",
    "MultiTaskSampling",
    "TaskBatch",
    "create_task_schedule",
    "largest_remainder",
    "list_task_schedules",
    "register_task_schedule",
]
