"""Metrics of online class-incremental learning: anytime accuracy, average / last accuracy, forgetting.

The set reported by Si-Blurry (Moon et al., "Online Class Incremental Learning on Stochastic Blurry Task
Boundary via Mask and Visual Prompt Tuning", ICCV 2023) and by the i-Blurry / CLIB line of work (Koh et
al., "Online Continual Learning on Class Incremental Blurry Task Configuration with Anytime Inference",
ICLR 2022):

* ``A_auc``: area under the accuracy-over-samples curve, accuracy measured every ``eval_period`` stream
  samples on the test samples of the classes seen so far (:func:`anytime_auc`);
* ``A_avg``: mean of the accuracies measured at the task ends (:func:`average_accuracy`);
* ``A_last``: the accuracy at the end of the last task (:func:`last_accuracy`);
* ``F_last``: mean over classes of (best earlier task-end accuracy of the class - its final accuracy)
  (:func:`forgetting_last`).

Every accuracy here is a fraction in ``[0, 1]`` (the papers print percentages). An accuracy of a class at
a task end is NaN where the class had not been exposed yet (or has no test sample): the per-class
matrices of this module are ``[task ends, classes]`` with NaN marking "not evaluated".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "accuracy_matrix",
    "anytime_auc",
    "average_accuracy",
    "class_accuracy",
    "forgetting_last",
    "last_accuracy",
]

ArrayLike = Sequence[float] | Sequence[Sequence[float]] | Tensor


def _as_float64(values: ArrayLike, name: str, dim: int) -> Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(tensor.shape)}")
    return tensor


def anytime_auc(accuracies: ArrayLike, samples: ArrayLike | None = None) -> float:
    """Anytime accuracy ``A_auc`` (Koh et al., "Online Continual Learning on Class Incremental Blurry Task
    Configuration with Anytime Inference", ICLR 2022; reported by Moon et al., Si-Blurry, ICCV 2023).

    Koh et al. define the area under the accuracy curve ``A_auc = sum_i f(i * dn) * dn`` with ``f`` the
    accuracy on the seen classes after ``i * dn`` stream samples and ``dn`` the evaluation period; divided
    by the number of samples it covers this is the mean of the periodic accuracies, which is what both
    official codes compute (``np.mean`` of the periodic test accuracies). With ``samples`` (the stream
    samples seen at each evaluation) each accuracy is weighted by the samples fed since the previous
    evaluation (the first by all samples so far):

        A_auc = sum_i acc_i * (n_i - n_{i-1}) / n_last,   n_0 = 0

    which equals the plain mean for equally spaced evaluations and keeps the meaning of an area when the
    gaps differ (e.g. a stream batch larger than the period crossing two multiples at once).

    Args:
        accuracies: ``[K]`` accuracies of the periodic evaluations, in order.
        samples: ``[K]`` strictly increasing positive sample counts of those evaluations; None: plain mean.

    Returns:
        The anytime accuracy, NaN when there is no evaluation.

    Examples:
        >>> anytime_auc([0.5, 0.7, 0.6])
        0.6
        >>> round(anytime_auc([0.5, 0.8], samples=[1000, 4000]), 4)
        0.725
    """
    acc = _as_float64(accuracies, "accuracies", 1)
    if acc.numel() == 0:
        return math.nan
    if samples is None:
        return float(acc.mean())
    counts = _as_float64(samples, "samples", 1)
    if counts.shape != acc.shape:
        raise ValueError(f"samples {tuple(counts.shape)} and accuracies {tuple(acc.shape)} must have the same length")
    gaps = torch.diff(counts, prepend=counts.new_zeros(1))
    if bool((gaps <= 0).any()):
        raise ValueError(f"samples must be strictly increasing and positive, got {counts.tolist()}")
    return float((acc * gaps).sum() / counts[-1])


def average_accuracy(task_end_accuracies: ArrayLike) -> float:
    """Average accuracy ``A_avg = (1 / T) sum_t a_t``, the mean of the accuracies measured at the end of each
    task on the test samples of the classes seen by then (Moon et al., "Online Class Incremental Learning
    on Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023).

    Args:
        task_end_accuracies: ``[T]`` accuracies at the task ends.

    Returns:
        The mean, NaN when empty.
    """
    acc = _as_float64(task_end_accuracies, "task_end_accuracies", 1)
    return float(acc.mean()) if acc.numel() else math.nan


def last_accuracy(task_end_accuracies: ArrayLike) -> float:
    """Last accuracy ``A_last = a_T``, the accuracy at the end of the last task, i.e. on the test samples
    of every class seen in the stream (Moon et al., Si-Blurry, ICCV 2023).

    Args:
        task_end_accuracies: ``[T]`` accuracies at the task ends.

    Returns:
        The last entry, NaN when empty.
    """
    acc = _as_float64(task_end_accuracies, "task_end_accuracies", 1)
    return float(acc[-1]) if acc.numel() else math.nan


def class_accuracy(correct: Tensor, total: Tensor, num_seen: int | None = None) -> Tensor:
    """Per-class accuracy ``correct / total`` as float64, NaN for classes ``>= num_seen`` (not exposed
    yet) and for classes without a test sample.

    Args:
        correct: ``[C]`` correctly classified test samples per class.
        total: ``[C]`` test samples per class.
        num_seen: classes exposed so far (a prefix in exposure order); None: all.
    """
    correct = torch.as_tensor(correct).detach().cpu().to(torch.float64)
    total = torch.as_tensor(total).detach().cpu().to(torch.float64)
    acc = correct / total.clamp_min(1)
    nan = torch.full_like(acc, math.nan)
    acc = torch.where(total > 0, acc, nan)
    if num_seen is not None:
        acc[int(num_seen) :] = math.nan
    return acc


def forgetting_last(class_accuracy_matrix: ArrayLike, exclude_never_correct: bool = False) -> float:
    """Last forgetting ``F_last`` (Moon et al., "Online Class Incremental Learning on Stochastic Blurry
    Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023):

        F_last = mean over classes c seen before the last task end of
                 (max_{t < T} a_{t, c} - a_{T, c})

    with ``a_{t, c}`` the accuracy of class ``c`` at the end of task ``t``. Classes exposed only in the last
    task (NaN in every earlier row) have nothing to forget and are left out; so are classes without a final
    accuracy. Negative terms (a class that improved) count as they are, as in the official code.

    The official Si-Blurry code keeps 0 for unseen classes and selects the classes whose best earlier
    accuracy is ``> 0``: a class seen but never classified right at an earlier task end (its term is
    ``0 - a_T <= 0``) is dropped there. ``exclude_never_correct=True`` reproduces that selection; the
    default keeps every class seen before the last task end, as the definition reads.

    Args:
        class_accuracy_matrix: ``[T, C]`` per-class accuracies at the task ends (rows in order), NaN where a
            class had not been seen.
        exclude_never_correct: drop the classes whose best earlier accuracy is 0 (official code).

    Returns:
        The forgetting, NaN with fewer than two task ends or no class to measure.

    Examples:
        >>> nan = float("nan")
        >>> forgetting_last([[1.0, nan], [0.5, 0.9]])
        0.5
    """
    acc = _as_float64(class_accuracy_matrix, "class_accuracy_matrix", 2)
    if acc.shape[0] < 2:
        return math.nan
    earlier, final = acc[:-1], acc[-1]
    seen_before = ~torch.isnan(earlier).all(dim=0) & ~torch.isnan(final)
    best = torch.nan_to_num(earlier, nan=-math.inf).max(dim=0).values
    if exclude_never_correct:
        seen_before &= best > 0
    if not bool(seen_before.any()):
        return math.nan
    return float((best[seen_before] - final[seen_before]).mean())


def accuracy_matrix(
    class_accuracy_matrix: ArrayLike,
    class_tasks: Sequence[int] | Tensor,
    num_tasks: int | None = None,
    class_counts: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Task-level accuracy matrix ``R[i, t]``: the accuracy at the end of task ``i`` on the classes first
    exposed in task ``t`` (the usual continual-learning matrix; in a blurry stream classes of task ``t``
    also appear in other tasks, so a column groups classes by first exposure, not by the samples' task).

    ``R[i, t]`` averages the available (non-NaN) class accuracies of the group, weighted by
    ``class_counts`` (test samples per class: the accuracy on the group's test samples) or equally (the
    class-balanced accuracy) when None. NaN where no class of the group had been seen at that task end.

    Args:
        class_accuracy_matrix: ``[T_end, C]`` per-class accuracies at the task ends (NaN = not seen).
        class_tasks: ``[C]`` task in which each class was first exposed, negative for classes never exposed
            (left out).
        num_tasks: columns of the result; the largest task in ``class_tasks`` + 1 when None.
        class_counts: ``[C]`` optional weights (test samples per class).

    Returns:
        ``[T_end, num_tasks]`` float64 matrix.

    Examples:
        >>> nan = float("nan")
        >>> accuracy_matrix([[1.0, 0.5, nan], [0.5, 0.5, 1.0]], class_tasks=[0, 0, 1]).tolist()
        [[0.75, nan], [0.5, 1.0]]
    """
    acc = _as_float64(class_accuracy_matrix, "class_accuracy_matrix", 2)
    tasks = torch.as_tensor(class_tasks, dtype=torch.long).cpu()
    if tasks.shape != (acc.shape[1],):
        raise ValueError(f"class_tasks must have one entry per class ({acc.shape[1]}), got {tuple(tasks.shape)}")
    if num_tasks is None:
        num_tasks = int(tasks.max()) + 1 if tasks.numel() and int(tasks.max()) >= 0 else 0
    weights = torch.ones(acc.shape[1], dtype=torch.float64)
    if class_counts is not None:
        weights = _as_float64(class_counts, "class_counts", 1)
        if weights.shape != tasks.shape:
            raise ValueError(f"class_counts must have one entry per class ({acc.shape[1]}), got {tuple(weights.shape)}")
    result = torch.full((acc.shape[0], int(num_tasks)), math.nan, dtype=torch.float64)
    for task in range(int(num_tasks)):
        group = acc[:, tasks == task]
        w = weights[tasks == task].expand_as(group)
        valid = ~torch.isnan(group) & (w > 0)
        mass = (w * valid).sum(dim=1)
        summed = torch.where(valid, group * w, torch.zeros_like(group)).sum(dim=1)
        result[:, task] = torch.where(mass > 0, summed / mass.clamp_min(1e-300), result[:, task])
    return result
