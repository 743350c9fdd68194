"""Choosing what to train on: ZIP-FIT compression-based data selection (with the corpus and tiny byte-level
language model of its recipe), multi-task samplers, active source sampling via Lasso, and task hinting."""

from lightning_mtl.selection.byte_lm import ByteLM
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
from lightning_mtl.selection.sorting_tasks import HINT_TASKS, SORTING_TASKS, SortingTasks, make_example
from lightning_mtl.selection.stdlib_corpus import StdlibCorpus
from lightning_mtl.selection.task_hinting import TaskHintingTransformer, exact_sequence_match
from lightning_mtl.selection.zipfit import CompressionSelected, CompressionSelector, ncd

__all__ = [
    "ByteLM",
    "CompressionSelected",
    "CompressionSelector",
    "StdlibCorpus",
    "ncd",
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
    "HINT_TASKS",
    "SORTING_TASKS",
    "SortingTasks",
    "TaskHintingTransformer",
    "exact_sequence_match",
    "make_example",
]
